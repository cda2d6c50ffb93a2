"""lm-evaluation-harness against the server, as an evaluation user runs it (slow: `make test-slow`).

A multiple-choice task that this test writes (a local JSON-lines dataset and a task YAML, nothing
from a hub) is scored twice on the same weights, a tiny random Llama in fp32: by lm-eval's
`local-completions` model against our server (echo with logprobs, max_tokens 1, prompts as token
ids in batches, the tokenizer read remotely through /tokenizer_info, /tokenize and /detokenize), and
by lm-eval's `hf` model (transformers in this process). Accuracy must be identical and every
choice's loglikelihood within 1e-3. BENCHMARKS.md records a run."""

from __future__ import annotations

import json
import random

import pytest

from tests.support.api_server import live_app, started_stack, tiny_settings
from tests.support.models import tiny_llama

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
lm_eval = pytest.importorskip("lm_eval")
TASK = "shardserve_mc"
WORDS = [
    "red",
    "green",
    "blue",
    "cat",
    "dog",
    "fox",
    "Paris",
    "France",
    "river",
    "tree",
    "house",
    "model",
    "server",
    "token",
    "batch",
]


def write_task(root, docs: int = 40) -> None:
    """A seeded multiple-choice task: a question, four choices, the index of the right one."""
    rng = random.Random(0)
    with open(root / "mc.jsonl", "w") as f:
        for i in range(docs):
            choices = rng.sample(WORDS, 4)
            question = f"Question {i}: which word comes after {' '.join(rng.sample(WORDS, 3))}?"
            f.write(json.dumps({"question": question, "choices": choices, "answer": rng.randrange(4)}) + "\n")
    (root / f"{TASK}.yaml").write_text(
        f"task: {TASK}\n"
        "dataset_path: json\n"
        "dataset_kwargs:\n"
        f"  data_files: {{test: {root / 'mc.jsonl'}}}\n"
        f"  cache_dir: {root / 'datasets'}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{question}}\\nAnswer:"\n'
        'doc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{answer}}"\n'
        "metric_list:\n"
        "  - metric: acc\n"
        "  - metric: acc_norm\n"
    )


def evaluate(model: str, model_args: dict, root) -> tuple[dict, dict[int, list[float]]]:
    from lm_eval.tasks import TaskManager

    out = lm_eval.simple_evaluate(
        model=model,
        model_args=model_args,
        tasks=[TASK],
        task_manager=TaskManager(include_path=str(root)),
        batch_size=8,
        log_samples=True,
    )
    per_choice = {s["doc_id"]: [r[0][0] for r in s["resps"]] for s in out["samples"][TASK]}
    return out["results"][TASK], per_choice


def test_lm_eval_local_completions_equals_hf_on_the_same_weights(tmp_path_factory) -> None:
    model_dir = tiny_llama(tmp_path_factory)
    root = tmp_path_factory.mktemp("lm_eval_task")
    write_task(root)
    settings = tiny_settings(model_dir, max_num_batched_tokens=128)
    with started_stack(settings) as stack, live_app(settings, stack) as srv:
        ours, ours_ll = evaluate(
            "local-completions",
            {"model": "tiny", "base_url": srv.url + "/v1/completions", "num_concurrent": 2, "max_retries": 1},
            root,
        )
    ref, ref_ll = evaluate("hf", {"pretrained": str(model_dir), "dtype": "float32", "device": "cpu"}, root)
    assert ours["acc,none"] == ref["acc,none"] and ours["acc_norm,none"] == ref["acc_norm,none"]
    assert ours_ll.keys() == ref_ll.keys() and len(ours_ll) == 40
    worst = max(abs(a - b) for d in ref_ll for a, b in zip(ours_ll[d], ref_ll[d], strict=True))
    print(f"acc {ours['acc,none']:.4f} (hf {ref['acc,none']:.4f}), acc_norm {ours['acc_norm,none']:.4f}; "
          f"largest loglikelihood difference {worst:.2e} over {4 * len(ref_ll)} choices")  # fmt: skip
    assert worst < 1e-3
