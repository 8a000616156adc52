"""Gradio UI for chatting with Mllama. Talks only to the serving engine."""
