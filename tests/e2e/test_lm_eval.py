"""A real evaluation harness as the client: lm-eval's `local-completions` model (echo + logprobs
for log-likelihoods, plain completions for generation) against `corolla up` serving SmolLM2 in
float32, compared with lm-eval's own `hf` backend on the same model. The tasks are built here from
local files: nothing is downloaded."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from shared.models.resolve import resolve_model
from tests.e2e.swarm import free_port

lm_eval = pytest.importorskip("lm_eval")

QUESTIONS = [
    ("The capital of France is", ["Paris", "Berlin", "Madrid"], 0),
    ("The largest planet in the solar system is", ["Mars", "Jupiter", "Venus"], 1),
    ("Water freezes at a temperature of zero degrees", ["Celsius", "Kelvin", "Newton"], 0),
    ("The opposite of hot is", ["warm", "cold", "blue"], 1),
    ("A week has seven", ["days", "months", "years"], 0),
    ("The color of the sky on a clear day is", ["green", "blue", "red"], 1),
    ("Two plus two equals", ["five", "four", "three"], 1),
    ("The first letter of the English alphabet is", ["A", "Z", "M"], 0),
]
GENERATION = [("Q: What is the capital of France?\nA:", "Paris"), ("Q: What color is grass?\nA:", "Green"),
              ("Q: How many legs does a cat have?\nA:", "Four"), ("Q: What is 2 + 3?\nA:", "5")]


def write_tasks(folder):
    with open(folder / "choice.jsonl", "w") as f:
        for question, choices, answer in QUESTIONS:
            f.write(json.dumps({"question": question, "choices": choices, "answer": answer}) + "\n")
    with open(folder / "gen.jsonl", "w") as f:
        for question, answer in GENERATION:
            f.write(json.dumps({"question": question, "answer": answer}) + "\n")
    (folder / "corolla_choice.yaml").write_text(f"""task: corolla_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {folder / "choice.jsonl"}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
""")
    (folder / "corolla_gen.yaml").write_text(f"""task: corolla_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {folder / "gen.jsonl"}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: " {{{{answer}}}}"
generation_kwargs:
  until: ["\\n", "."]
  max_gen_toks: 12
  do_sample: false
metric_list:
  - metric: exact_match
    ignore_case: true
    ignore_punctuation: true
""")


def scores(results: dict) -> dict:
    out = {}
    for task, values in results["results"].items():
        for key, value in values.items():
            if key.endswith(",none") and "stderr" not in key:
                out[(task, key.split(",")[0])] = value
    return out


def sample_logliks(results: dict) -> list[float]:
    return [float(r[0][0]) for s in results["samples"]["corolla_choice"] for r in s["resps"]]


def generations(results: dict) -> list[str]:
    return [s["resps"][0][0] for s in results["samples"]["corolla_gen"]]


def test_lm_eval_scores_through_the_gateway_equal_its_hf_backend(tmp_path):
    from lm_eval.tasks import TaskManager

    write_tasks(tmp_path)
    model_dir = resolve_model("smollm2")
    tasks = TaskManager(include_path=str(tmp_path))
    port = free_port()
    log = tmp_path / "up.log"
    with open(log, "wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "corolla", "up", "--servers", "2", "--port", str(port),
                                    "--dtype", "float32"], stdout=out, stderr=subprocess.STDOUT,
                                   env=dict(os.environ, PYTHONUNBUFFERED="1"))
    try:
        deadline = time.monotonic() + 300
        while "corolla: ready" not in log.read_text():
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        served = lm_eval.simple_evaluate(
            model="local-completions", tasks=["corolla_choice", "corolla_gen"], task_manager=tasks,
            model_args=f"base_url=http://127.0.0.1:{port}/v1/completions,model=SmolLM2-135M-Instruct,"
                       f"tokenizer_backend=huggingface,tokenizer={model_dir},num_concurrent=4,max_retries=1",
            log_samples=True)
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(60)
    local = lm_eval.simple_evaluate(model="hf", tasks=["corolla_choice", "corolla_gen"], task_manager=tasks,
                                    model_args=f"pretrained={model_dir},dtype=float32", device="cpu", log_samples=True)
    print("\ntask            metric       gateway   hf")
    for key, value in sorted(scores(local).items()):
        print(f"{key[0]:15} {key[1]:12} {scores(served)[key]:.4f}    {value:.4f}")
    assert scores(served) == pytest.approx(scores(local), abs=1e-6)
    # the log-likelihoods themselves, choice by choice, within float32 rounding
    assert sample_logliks(served) == pytest.approx(sample_logliks(local), abs=1e-3)
    # and the greedy generations, word for word
    assert generations(served) == generations(local)
    print("generations:", generations(served))
