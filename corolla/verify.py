"""`corolla verify-model`: run a model split into spans against the same model run whole by
transformers, and report how far the logits and greedy tokens are apart."""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from shared.dtypes import DTYPE_CHOICES, dtype_name
from shared.models.loader import load_config, load_ends, load_span, load_tokenizer, num_layers
from shared.models.quant import QUANT_MODES
from shared.models.resolve import resolve_model
from shared.records import even_spans

DESCRIPTION = """\
Split MODEL into N spans, run a prefill plus K greedy decode steps through them, and compare every
step's logits with the same model run whole by transformers. Prints the largest logit difference
and the greedy-token agreement; exits 1 when they differ beyond tolerance (float32: 1e-3 absolute;
16-bit: 2.5% of the largest logit).

With --quant, the spans' weights are quantized as a blockserver's would be and compared with the
unquantized model in the same dtype; quantization changes the model, so the bounds are wider:
int8 within 10% of the largest logit, nf4 within 35%, and no decisive mismatch (a token whose
reference lead exceeds the bound); greedy agreement is reported. 4-bit weights cost small models
much more than large ones: SmolLM2-135M fails the nf4 bound (int8 is the mode for it)."""

DEFAULT_PROMPT = "The capital of France is"
# float32: the chain must agree with transformers to rounding noise. 16-bit dtypes round
# differently when a prefill is split into steps, so their bound is relative to the logits' scale.
FLOAT32_ATOL = 1e-3
HALF_RTOL = 2.5e-2
# quantized weights: the bound on |Δlogit| relative to the largest logit
QUANT_BOUNDS = {"int8": 0.10, "nf4": 0.35}


@dataclass
class VerifyReport:
    model: str
    spans: list[str]
    dtype: str
    quant: str
    steps: int
    max_abs_diff: float
    logit_scale: float  # the largest |logit| of the reference
    tolerance: float
    agreement: float  # fraction of steps whose argmax is the same
    decisive_mismatches: int  # argmax differs where the reference's top-2 margin exceeds the tolerance
    reference_text: str
    chain_text: str
    seconds: float

    @property
    def ok(self) -> bool:
        return self.max_abs_diff <= self.tolerance and self.decisive_mismatches == 0

    def render(self) -> str:
        verdict = "PASS" if self.ok else "FAIL"
        return "\n".join([
            f"model        {self.model}",
            f"spans        {' '.join(self.spans)}   dtype {self.dtype}   quant {self.quant}   decode steps {self.steps}",
            f"max |Δlogit| {self.max_abs_diff:.3g}  (tolerance {self.tolerance:.3g}; logits reach {self.logit_scale:.3g})",
            f"greedy agree {self.agreement:.1%}  ({self.decisive_mismatches} decisive mismatches)",
            f"reference    {self.reference_text!r}",
            f"chain        {self.chain_text!r}",
            f"{verdict} in {self.seconds:.1f}s",
        ])


def verify_model(model_dir: Path, spans: int = 3, steps: int = 20, dtype: str = "float32",
                 prompt: str = DEFAULT_PROMPT, device: str = "cpu", quant: str = "none") -> VerifyReport:
    """Prefill `prompt` then `steps` greedy decode steps, teacher-forced on the reference's tokens
    (the unquantized model's, when `quant` quantizes the spans)."""
    from transformers import AutoModelForCausalLM

    started = time.monotonic()
    config = load_config(model_dir)
    layout = even_spans(num_layers(config), spans)
    chain = [load_span(model_dir, s.start, s.end, device, dtype, quant=quant) for s in layout]
    ends = load_ends(model_dir, device, dtype)
    torch_dtype = chain[0].dtype
    reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype).to(device).eval()
    input_ids = _prompt_ids(model_dir, prompt, config.vocab_size).to(device)

    caches = [span.new_cache(1, input_ids.shape[1] + steps + 1) for span in chain]
    new = input_ids
    ids = input_ids
    max_diff, scale, agree, decisive = 0.0, 0.0, 0, 0
    ref_tokens, chain_tokens = [], []
    comparisons = []
    for _ in range(steps + 1):
        hidden = ends.embed_tokens(new)
        for span, cache in zip(chain, caches):
            hidden = span.step(hidden, cache)
        got = ends.logits(hidden)[0, -1]
        with torch.inference_mode():
            want = reference(input_ids=ids).logits[0, -1].float()
        comparisons.append((got, want))
        scale = max(scale, want.abs().max().item())
        ref_token, chain_token = int(want.argmax()), int(got.argmax())
        ref_tokens.append(ref_token)
        chain_tokens.append(chain_token)
        new = torch.tensor([[ref_token]], device=device)
        ids = torch.cat([ids, new], dim=1)
    if quant in QUANT_BOUNDS:
        tolerance = QUANT_BOUNDS[quant] * scale
    else:
        tolerance = FLOAT32_ATOL if torch_dtype == torch.float32 else HALF_RTOL * scale
    for got, want in comparisons:
        max_diff = max(max_diff, (got - want).abs().max().item())
        if int(got.argmax()) == int(want.argmax()):
            agree += 1
        else:
            top2 = want.topk(2).values
            decisive += int((top2[0] - top2[1]).item() > tolerance)
    tokenizer = load_tokenizer(model_dir)
    decode = tokenizer.decode if tokenizer is not None else str
    return VerifyReport(
        model=str(model_dir), spans=[str(s) for s in layout], dtype=dtype_name(torch_dtype), quant=quant, steps=steps,
        max_abs_diff=max_diff, logit_scale=scale, tolerance=tolerance, agreement=agree / len(comparisons),
        decisive_mismatches=decisive, reference_text=decode(ref_tokens), chain_text=decode(chain_tokens),
        seconds=time.monotonic() - started,
    )


def _prompt_ids(model_dir: Path, prompt: str, vocab_size: int) -> torch.Tensor:
    tokenizer = load_tokenizer(model_dir)
    if tokenizer is None:  # no tokenizer: a fixed pseudo-random prompt of 12 token ids
        generator = torch.Generator().manual_seed(0)
        return torch.randint(3, vocab_size, (1, 12), generator=generator)
    return tokenizer(prompt, return_tensors="pt").input_ids


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", nargs="?", default=None,
                        help="a directory with config.json and *.safetensors, a Hugging Face hub id, "
                             "or 'smollm2' (the default: SmolLM2-135M-Instruct, converted offline)")
    parser.add_argument("--spans", type=int, default=3, help="number of spans to split the layers into (default 3)")
    parser.add_argument("--steps", type=int, default=20, help="greedy decode steps after the prefill (default 20)")
    parser.add_argument("--dtype", default="float32", choices=DTYPE_CHOICES, help="dtype of both runs (default float32)")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT, help="prompt to start from")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument("--quant", default="none", choices=QUANT_MODES,
                        help="quantize the spans' weights as a blockserver with --quant would (default none)")
    parser.add_argument("--cache-dir", default=None, help="where converted models are kept (default ~/.cache/corolla)")


def run(args: argparse.Namespace) -> int:
    model_dir = resolve_model(args.model, args.cache_dir)
    report = verify_model(model_dir, spans=args.spans, steps=args.steps, dtype=args.dtype, prompt=args.prompt,
                          device=args.device, quant=args.quant)
    print(report.render())
    return 0 if report.ok else 1
