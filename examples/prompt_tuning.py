"""Prompt-tune SmolLM2 through a swarm, then serve the tuned prompt with the OpenAI API.

    python examples/prompt_tuning.py [--steps 40] [--out tuned-sentiment]

1. Starts a local swarm (what `corolla up` starts: a gateway and 3 blockservers of SmolLM2), or
   uses yours with --gateway URL (then it cannot restart your gateway for step 5).
2. Builds a small sentiment task offline: reviews made from templates, each labelled " positive"
   or " negative", split into training and held-out examples.
3. Measures the held-out accuracy of the plain model through the gateway (greedy first token).
4. Trains a soft prompt and deep prompts (8 virtual tokens) with Adam; the 30 frozen layers run
   forward and backward on the blockservers. Prints the loss per step; saves the loss curve
   (PNG, with matplotlib if installed) and the prompts (safetensors).
5. Restarts the gateway with `--prompt-adapter sentiment=PATH`, measures the held-out accuracy of
   `"model": "sentiment"` and shows an OpenAI SDK request that uses it.
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

import httpx
import torch
from openai import OpenAI

from corolla.local import LocalSwarm
from gateway.tuning import PromptTuning
from shared.models.loader import load_tokenizer
from shared.models.resolve import resolve_model

MODEL = "SmolLM2-135M-Instruct"
THINGS = ["pasta", "hotel room", "concert", "movie", "service", "coffee", "book", "phone", "game", "pizza",
          "train ride", "museum", "soup", "laptop", "garden", "show", "camera", "bakery", "lesson", "bike"]
GOOD = ["wonderful", "delicious", "excellent", "lovely", "amazing", "fantastic", "superb", "delightful",
        "brilliant", "charming", "perfect", "great"]
BAD = ["terrible", "awful", "bland", "horrible", "disappointing", "dreadful", "broken", "boring", "rude",
       "dirty", "useless", "bad"]
TEMPLATES = ["The {thing} was {word}.", "I found the {thing} {word}.", "What a {word} {thing}!",
             "Honestly, the {thing} felt {word}.", "Our {thing} turned out {word}."]


def task(seed: int = 0) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(text, label) pairs: every template, thing and word, shuffled; 80% to train, 20% held out."""
    examples = [(t.format(thing=thing, word=w), label) for t in TEMPLATES for thing in THINGS
                for words, label in ((GOOD, " positive"), (BAD, " negative")) for w in words]
    random.Random(seed).shuffle(examples)
    cut = int(len(examples) * 0.8)
    return examples[:cut], examples[cut:]


def prompt(text: str) -> str:
    return f"Review: {text}\nSentiment:"


def accuracy(url: str, model: str, examples: list[tuple[str, str]]) -> float:
    """Greedy first token through the gateway, compared with the label."""
    client = OpenAI(base_url=f"{url}/v1", api_key="unused")
    right = 0
    for text, label in examples:
        answer = client.completions.create(model=model, prompt=prompt(text), max_tokens=1, temperature=0)
        right += answer.choices[0].text == label
    return right / len(examples)


def batches(examples, tokenizer, size: int, rng: random.Random):
    """Endless batches: input ids (right-padded), attention mask, labels (-100 but on the answer)."""
    while True:
        chosen = rng.sample(examples, size)
        rows = [tokenizer(prompt(text) + label).input_ids for text, label in chosen]
        longest = max(len(r) for r in rows)
        ids = torch.full((size, longest), tokenizer.pad_token_id or 0)
        mask = torch.zeros(size, longest, dtype=torch.long)
        labels = torch.full((size, longest), -100)
        for i, row in enumerate(rows):
            ids[i, :len(row)] = torch.tensor(row)
            mask[i, :len(row)] = 1
            labels[i, len(row) - 1] = row[-1]  # only the answer token is learned
        yield ids, mask, labels


def plot(losses: list[float], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(range(1, len(losses) + 1), losses, marker="o", markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (cross-entropy of the answer)")
    ax.set_title("Prompt tuning SmolLM2-135M through the swarm")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gateway", default=None, help="an existing gateway (default: start a local swarm)")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--prompt-length", type=int, default=8)
    parser.add_argument("--out", default="tuned-sentiment", help="folder for the prompts and the loss curve")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train, held_out = task()
    print(f"task: {len(train)} training and {len(held_out)} held-out reviews, labels ' positive' / ' negative'")

    swarm = None
    url = args.gateway
    if url is None:
        swarm = LocalSwarm("smollm2", Path(tempfile.mkdtemp(prefix="corolla-tuning-")), model_name=MODEL)
        print("starting a local swarm: a gateway and 3 blockservers of SmolLM2 (layers 0:10 10:20 20:30)")
        swarm.start(["0:10", "10:20", "20:30"], timeout_s=600)
        url = swarm.url
    try:
        before = accuracy(url, MODEL, held_out)
        print(f"held-out accuracy of the plain model: {before:.1%}")

        model = PromptTuning.connect(url, prompt_length=args.prompt_length, deep=True)
        tokenizer = load_tokenizer(resolve_model(None))
        optimizer = torch.optim.Adam(model.trainable_parameters(), lr=args.lr)
        losses = []
        data = batches(train, tokenizer, args.batch, random.Random(1))
        started = time.monotonic()
        for step in range(1, args.steps + 1):
            ids, mask, labels = next(data)
            loss = model(ids, mask, labels=labels).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
            print(f"step {step:3d}  loss {loss.item():.4f}  ({time.monotonic() - started:.0f}s)", flush=True)
        weights = out / "sentiment.safetensors"
        model.save(weights)
        model.close()
        curve = out / "loss.png"
        print(f"prompts saved to {weights}" + (f"; loss curve in {curve}" if plot(losses, curve) else
                                                "; install matplotlib for the loss curve"))
        if swarm is None:
            print(f"serve them: corolla gateway ... --prompt-adapter sentiment={weights.resolve()}")
            return
        swarm.restart_gateway(["--prompt-adapter", f"sentiment={weights.resolve()}"])
        print("gateway restarted with --prompt-adapter sentiment=...; models:",
              [m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"]])
        after = accuracy(url, "sentiment", held_out)
        print(f"held-out accuracy: plain model {before:.1%} -> tuned prompt {after:.1%}")
        client = OpenAI(base_url=f"{url}/v1", api_key="unused")
        review = "The dessert was heavenly and the staff were kind."
        answer = client.completions.create(model="sentiment", prompt=prompt(review), max_tokens=1, temperature=0)
        print(f'\nclient.completions.create(model="sentiment", prompt={prompt(review)!r}, max_tokens=1)'
              f"\n  -> {answer.choices[0].text!r}")
    finally:
        if swarm is not None:
            swarm.stop()


if __name__ == "__main__":
    main()
