"""Train the embedded default checkpoint, assets/tiny-mllama: a tiny Mllama that looks at the picture.

    python scripts/train_tiny.py --out assets/tiny-mllama --steps 10000 --pool 10000 --eval-every 1000  # the shipped run (~45 min)
    python scripts/train_tiny.py --out /tmp/x --steps 3 --pool 8 --eval 4  # a smoke run

Data: scripts/synthetic.py pictures (1 to 3 shapes of one kind and colour). Each training sample
is a conversation about one picture with four turns (colour, shape, count, description in random
order), rendered exactly as the Instruct chat template renders it; the loss is on the answers
(and their <|eot_id|>), plus training-only label heads on the vision tower (PictureLabelHeads).
One vision pass thus teaches four answers; the first turn is, under causal attention, exactly a
single-question prompt, and the later turns teach follow-ups answered from the first turn's image.

The pictures of a run are drawn once into a pool and preprocessed once (processing dominates on
two cores); the evaluation pictures use another seed and odd canvas sides, training even ones,
so no evaluation canvas size was ever seen in training. With --minutes the cosine schedule
follows the clock, so a run ends on time however busy the shared machine is.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model import MllamaConfig, MllamaForConditionalGeneration, MllamaImageProcessor  # noqa: E402
from model.config import MllamaTextConfig, MllamaVisionConfig  # noqa: E402
from scripts import synthetic  # noqa: E402
from scripts.make_tokenizer import (BOS, EOS_BASE, EOT, IMAGE, PAD, build_small_tokenizer,  # noqa: E402
                                    write_tokenizer_files)

VOCAB = 512  # ordinary BPE tokens; the 257 Llama 3 special tokens follow
# One 128-px tile: no shape is ever cut by a tile border, and the 'local' layers see the whole
# picture (counting needs that); a square picture gets the same 128x128 pixels as 2x2 64-px tiles.
TILE, PATCH, MAX_TILES = 128, 8, 1
PREPROCESSOR = {
    "do_convert_rgb": True, "do_normalize": True, "do_pad": True, "do_rescale": True, "do_resize": True,
    "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
    "image_processor_type": "MllamaImageProcessor", "max_image_tiles": MAX_TILES, "processor_class": "MllamaProcessor",
    "resample": 2, "rescale_factor": 1 / 255, "size": {"height": TILE, "width": TILE},
}
HEADER = "<|start_header_id|>{}<|end_header_id|>\n\n"
# The Llama 3.2 Vision Instruct template as published on the Hub (kept as test data).
CHAT_TEMPLATE_FILE = Path(__file__).resolve().parents[1] / "tests" / "data" / "chat_template.json"


def tokenizer_corpus() -> list[str]:
    """Every phrasing the model will be asked and answer, plus the chat template's own words."""
    rng = random.Random(0)
    # The template's words are frequent in every prompt: weight them so each becomes one token.
    texts = [HEADER.format(role) for role in ("user", "assistant", "system")] * 2000
    texts += ["Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"] * 100
    for _ in range(2000):
        count = rng.randint(1, 3)
        for task in synthetic.TASKS:
            texts.append(synthetic.question(task, count, rng))
            texts.append(synthetic.answer(task, rng.choice(list(synthetic.COLORS)), rng.choice(synthetic.SHAPES), count))
    return texts


def tiny_config(vocab_size: int, image_token: int, bos: int, eos: list[int], pad: int) -> MllamaConfig:
    """Widths and depths small enough to train on two CPU cores (see assets/tiny-mllama/README.md)."""
    vision = MllamaVisionConfig(
        hidden_size=64, attention_heads=4, num_hidden_layers=4, num_global_layers=1, intermediate_size=256,
        vision_output_dim=64 * 3, intermediate_layers_indices=[1, 3], image_size=TILE, patch_size=PATCH,
        max_num_tiles=MAX_TILES, supported_aspect_ratios=[[1, 1]])
    text = MllamaTextConfig(
        vocab_size=vocab_size, hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=384, cross_attention_layers=[1, 3], max_position_embeddings=1024, rope_theta=500000.0,
        bos_token_id=bos, eos_token_id=eos, pad_token_id=pad)
    return MllamaConfig(vision_config=vision, text_config=text, image_token_index=image_token,
                        architectures=["MllamaForConditionalGeneration"], torch_dtype="float32")


def init_weights(model: nn.Module, gate: float) -> None:
    """transformers' initialisation (normal 0.02), but with the gates already part open: a zero
    cross-attention gate passes no gradient to the vision tower at the start. The class token and
    the per-patch position table keep Meta's scale (hidden_size ** -0.5): at 0.02 they would be
    invisible next to the patch embeddings, and the tower would start as a bag of patches."""
    for name, param in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if name.endswith(("class_embedding", "gated_positional_embedding.embedding")):
            continue
        if "gate" in leaf:
            nn.init.constant_(param, gate)
        elif "norm" in name and param.dim() == 1:
            nn.init.ones_(param) if leaf == "weight" else nn.init.zeros_(param)
        elif leaf == "bias":
            nn.init.zeros_(param)
        else:
            nn.init.normal_(param, std=0.02)
    with torch.no_grad():  # the positional table starts as the one in use; the tile blend is learned
        model.vision_model.gated_positional_embedding.gate.zero_()


@dataclass
class Vocab:
    """The token ids training needs."""
    bos: int
    eot: int
    pad: int
    image: int


class ChatEncoder:
    """Token ids and answer-only labels for a conversation about one picture.

    Builds the ids segment by segment; each segment is bounded by special tokens, so this equals
    tokenizing the chat template's rendering (tests/test_tiny_model.py checks it)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        ids = {t: tokenizer.token_to_id(t) for t in (BOS, EOT, PAD, IMAGE)}
        self.vocab = Vocab(bos=ids[BOS], eot=ids[EOT], pad=ids[PAD], image=ids[IMAGE])

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def prompt(self, question: str, first: bool) -> list[int]:
        image = IMAGE if first else ""
        return self._ids(HEADER.format("user") + image + question + EOT + HEADER.format("assistant"))

    def conversation(self, qa: list[tuple[str, str]]) -> tuple[list[int], list[int]]:
        ids, labels = [self.vocab.bos], [-100]
        for turn, (question, answer) in enumerate(qa):
            prompt, reply = self.prompt(question, turn == 0), self._ids(answer + EOT)
            ids += prompt + reply
            labels += [-100] * len(prompt) + reply
        return ids, labels


class PicturePool:
    """Pictures drawn once and preprocessed once; pixel values kept in float16 to save memory."""

    def __init__(self, processor: MllamaImageProcessor, count: int, seed: int, parity: int) -> None:
        rng = random.Random(seed)
        self.samples = [synthetic.make_sample(rng, parity=parity) for _ in range(count)]
        parts = [processor([[s.image] for s in self.samples[i:i + 64]], return_tensors="pt") for i in range(0, count, 64)]
        self.pixel_values = torch.cat([p["pixel_values"].half() for p in parts])
        self.aspect_ratio_ids = torch.cat([p["aspect_ratio_ids"] for p in parts])
        self.aspect_ratio_mask = torch.cat([p["aspect_ratio_mask"] for p in parts])
        self.num_tiles = [n[0] for p in parts for n in p["num_tiles"]]
        for s in self.samples:
            s.image = None  # the pool keeps only the pixel values

    def __len__(self) -> int:
        return len(self.samples)


def make_batch(pool: PicturePool, indices: list[int], conversations: list[tuple[list[int], list[int]]],
               vocab: Vocab, max_tiles: int) -> dict[str, torch.Tensor]:
    """Right-padded ids/labels plus the pool's image fields and the cross-attention mask."""
    length = max(len(ids) for ids, _ in conversations)
    batch = len(indices)
    input_ids = torch.full((batch, length), vocab.pad)
    labels = torch.full((batch, length), -100)
    attention_mask = torch.zeros(batch, length, dtype=torch.long)
    cross = torch.zeros(batch, length, 1, max_tiles, dtype=torch.long)
    for row, (index, (ids, labs)) in enumerate(zip(indices, conversations)):
        input_ids[row, :len(ids)] = torch.tensor(ids)
        labels[row, :len(labs)] = torch.tensor(labs)
        attention_mask[row, :len(ids)] = 1
        cross[row, ids.index(vocab.image):, 0, :pool.num_tiles[index]] = 1  # the processor's mask, to the end
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask, "cross_attention_mask": cross,
            "pixel_values": pool.pixel_values[indices].float(), "aspect_ratio_ids": pool.aspect_ratio_ids[indices],
            "aspect_ratio_mask": pool.aspect_ratio_mask[indices]}


class PictureLabelHeads(nn.Module):
    """Training-only linear heads on the vision tower's output, pooled by mean and max over its
    tokens: colour, shape and count. Through the answers alone the gradient reaches the tower only
    via the gated cross-attention and shape/count stay near chance for thousands of steps; this
    short path teaches them in a few hundred. The heads are not part of the checkpoint."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        width = model.config.vision_config.vision_output_dim
        self.heads = nn.Linear(2 * width, len(synthetic.COLORS) + len(synthetic.SHAPES) + 3)
        self.features: torch.Tensor | None = None
        model.vision_model.register_forward_hook(
            lambda _module, _inputs, output: setattr(self, "features", output.last_hidden_state))

    def loss(self, samples: list[synthetic.Sample]) -> torch.Tensor:
        features = self.features.flatten(1, 3)  # (B, N*T*P, vision_output_dim)
        logits = self.heads(torch.cat([features.mean(1), features.amax(1)], dim=-1))
        colors, shapes = list(synthetic.COLORS), list(synthetic.SHAPES)
        targets = [torch.tensor([colors.index(s.color) for s in samples]),
                   torch.tensor([shapes.index(s.shape) for s in samples]),
                   torch.tensor([s.count - 1 for s in samples])]
        parts = logits.split([len(colors), len(shapes), 3], dim=-1)
        return sum(F.cross_entropy(part, target) for part, target in zip(parts, targets))


def answer_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean next-token loss over answer tokens, and per-row exact match of all answer tokens
    under teacher forcing (which is exactly "greedy decoding reproduces the answer")."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs, use_cache=False).logits[:, :-1]
    target = batch["labels"][:, 1:]
    loss = F.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=-100)
    exact = ((logits.argmax(-1) == target) | (target == -100)).all(-1)
    return loss, exact


@torch.no_grad()
def evaluate(model: nn.Module, pool: PicturePool, encoder: ChatEncoder, max_tiles: int,
             batch_size: int = 50) -> dict[str, float]:
    """Exact-match accuracy per task, one single-turn question per task and picture."""
    model.eval()
    hits = {task: 0 for task in synthetic.TASKS}
    for start in range(0, len(pool), batch_size):
        indices = list(range(start, min(start + batch_size, len(pool))))
        for task in synthetic.TASKS:
            samples = [pool.samples[i] for i in indices]
            convs = [encoder.conversation([(synthetic.question(task, s.count),
                                            synthetic.answer(task, s.color, s.shape, s.count))]) for s in samples]
            _, exact = answer_loss(model, make_batch(pool, indices, convs, encoder.vocab, max_tiles))
            hits[task] += int(exact.sum())
    model.train()
    return {task: hits[task] / len(pool) for task in synthetic.TASKS}


def learning_rate(step: int, progress: float, peak: float, warmup: int) -> float:
    """Linear warm-up over `warmup` steps, then cosine decay to 5 % of the peak at progress 1."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def write_checkpoint(model: MllamaForConditionalGeneration, tokenizer, out: Path) -> None:
    """The official Hub layout: config, generation config, weights, tokenizer, template, preprocessor."""
    text = model.config.text_config
    # Greedy by default: the toy model's answers are meant to be checked.
    model.generation_config = {"bos_token_id": text.bos_token_id, "eos_token_id": text.eos_token_id,
                               "pad_token_id": text.pad_token_id, "do_sample": False}
    model.save_pretrained(out)
    write_tokenizer_files(tokenizer, out, json.loads(CHAT_TEMPLATE_FILE.read_text())["chat_template"])
    (out / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR, indent=2) + "\n")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="checkpoint folder to write")
    parser.add_argument("--steps", type=int, default=3000, help="at most this many steps")
    parser.add_argument("--minutes", type=float, default=None,
                        help="time budget for the training steps: the schedule follows the clock and ends "
                             "on time, however busy the machine (the step count lands in the report)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--pool", type=int, default=5000, help="training pictures, drawn once")
    parser.add_argument("--eval", type=int, default=200, help="held-out pictures for the accuracy report")
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    started = time.time()

    tokenizer = build_small_tokenizer(tokenizer_corpus(), VOCAB)
    encoder = ChatEncoder(tokenizer)
    v = encoder.vocab
    config = tiny_config(vocab_size=v.image, image_token=v.image, bos=v.bos,
                         eos=[tokenizer.token_to_id(EOS_BASE), tokenizer.token_to_id("<|eom_id|>"), v.eot], pad=v.pad)
    model = MllamaForConditionalGeneration(config)
    init_weights(model, gate=0.5)
    processor = MllamaImageProcessor(**PREPROCESSOR)

    train = PicturePool(processor, args.pool, seed=args.seed + 1, parity=0)
    held_out = PicturePool(processor, args.eval, seed=args.seed + 1_000_003, parity=1)
    print(f"pools ready in {time.time() - started:.0f}s; {sum(p.numel() for p in model.parameters()):,} parameters",
          flush=True)

    heads = PictureLabelHeads(model)
    optimizer = torch.optim.AdamW([*model.parameters(), *heads.parameters()], lr=args.lr, betas=(0.9, 0.98),
                                  weight_decay=0.01)
    rng = random.Random(args.seed + 2)
    warmup = max(1, min(100, args.steps // 10))
    training_started, running, step = time.time(), 0.0, 0
    while step < args.steps:
        progress = step / args.steps
        if args.minutes is not None:
            progress = max(progress, (time.time() - training_started) / (60 * args.minutes))
            if progress >= 1:
                break
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, progress, args.lr, warmup)
        indices = [rng.randrange(len(train)) for _ in range(args.batch_size)]
        convs = [encoder.conversation(synthetic.conversation(train.samples[i], rng)) for i in indices]
        loss, _ = answer_loss(model, make_batch(train, indices, convs, v, MAX_TILES))
        loss = loss + heads.loss([train.samples[i] for i in indices])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1
        running += loss.item()
        if step % 25 == 0:
            print(f"step {step} loss {running / 25:.4f} lr {optimizer.param_groups[0]['lr']:.2e} "
                  f"{time.time() - started:.0f}s", flush=True)
            running = 0.0
        if step % args.eval_every == 0:
            print(f"step {step} held-out {evaluate(model, held_out, encoder, MAX_TILES)}", flush=True)
            write_checkpoint(model, tokenizer, args.out)  # a usable checkpoint at every evaluation

    accuracy = evaluate(model, held_out, encoder, MAX_TILES)
    minutes = (time.time() - started) / 60
    print(f"final held-out exact match {accuracy}; {minutes:.1f} min", flush=True)
    write_checkpoint(model, tokenizer, args.out)
    report = {"command": " ".join(["python", "scripts/train_tiny.py", *(argv if argv is not None else sys.argv[1:])]),
              "minutes": round(minutes, 1), "held_out_exact_match": accuracy, "steps": step}
    (args.out / "training_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
