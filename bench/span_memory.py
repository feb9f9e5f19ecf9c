"""Load time and resident memory of one span vs the whole model (each measured in a fresh process).

    python bench/span_memory.py [MODEL] [--dtype float32]

Prints, for a span of a third of the layers, all layers through Corolla's loader, and the whole
model through transformers' from_pretrained: seconds to load and RSS growth (after one forward
pass, so that memory-mapped weights are resident)."""

import argparse
import json
import subprocess
import sys

CHILD = """
import json, sys, time, psutil, torch
torch.set_num_threads(2)
what, model_dir, dtype, start, end = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
from transformers import AutoModelForCausalLM
from shared.models.loader import load_span
process = psutil.Process()  # imports done: count only what loading adds
before = process.memory_info().rss
t0 = time.monotonic()
if what == "span":
    span = load_span(model_dir, start, end, dtype=dtype)
    seconds = time.monotonic() - t0
    span.step(torch.zeros(1, 8, span.hidden_size), span.new_cache(1, 8))
else:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype))
    seconds = time.monotonic() - t0
    with torch.inference_mode():
        model(torch.zeros(1, 8, dtype=torch.long))
print(json.dumps({"seconds": seconds, "rss_mib": (process.memory_info().rss - before) / 2**20}))
"""


def measure(what, model_dir, dtype, start, end):
    out = subprocess.run([sys.executable, "-c", CHILD, what, str(model_dir), dtype, str(start), str(end)],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", default="smollm2")
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()
    from shared.models.loader import load_config
    from shared.models.resolve import resolve_model

    model_dir = resolve_model(args.model)
    n = load_config(model_dir).num_hidden_layers
    rows = [(f"span of {n // 3}/{n} layers", "span", 0, n // 3),
            (f"all {n} layers (corolla)", "span", 0, n),
            ("whole model (transformers)", "whole", 0, n)]
    print(f"{'what':32} {'load s':>8} {'RSS MiB':>9}   model {args.model}, {args.dtype}")
    for label, what, start, end in rows:
        r = measure(what, model_dir, args.dtype, start, end)
        print(f"{label:32} {r['seconds']:8.2f} {r['rss_mib']:9.1f}")


if __name__ == "__main__":
    main()
