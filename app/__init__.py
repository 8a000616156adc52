"""Gradio UI for chatting with Mllama. Talks only to model.engine."""
