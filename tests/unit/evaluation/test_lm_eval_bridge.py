import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_models import save_tiny, tiny_model, tiny_tokenizer

from drpruning.evaluation import lm_eval_bridge as B
from drpruning.evaluation import tasks as T

SHARED_EVAL = Path(__file__).resolve().parents[2] / "shared" / "eval"
needs_lm_eval = pytest.mark.skipif(not B.lm_eval_available(),
                                   reason=f"lm-evaluation-harness is not installed ({B.INSTALL_HINT})")
OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}

CHOICE = [{"query": "Q: 2+2?", "choices": ["4", "five", "22"], "gold": 0},
          {"query": "Sky is", "choices": ["blue.", "green grass"], "gold": 1},
          {"query": "A, B,", "choices": ["C", "D", "E!", "zz"], "gold": 2}]
WINO = [{"context_options": ["Tom hit Bob so Tom", "Tom hit Bob so Bob"], "continuation": "cried.",
         "gold": 1},
        {"context_options": ["It is a", "It is an"], "continuation": "apple", "gold": 0}]
COMPLETION = [{"context": "Once upon a", "continuation": "time"},
              {"context": "Hello", "continuation": "world"}]


@pytest.fixture
def offline(monkeypatch, tmp_path):
    for k, v in OFFLINE.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))


def write_tasks(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, items in (("mc", CHOICE), ("wino", WINO), ("compl", COMPLETION)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(i) + "\n" for i in items))
    return folder


def test_missing_lm_eval_gives_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval now raises ImportError
    with pytest.raises(ImportError, match=r"pip install lm-eval==0.4.13"):
        B.require_lm_eval()
    assert not B.lm_eval_available()


def test_task_config_per_shape(tmp_path):
    folder = write_tasks(tmp_path / "tasks")
    name = B.write_task_yaml(folder / "mc.jsonl", tmp_path / "yaml")
    config = json.loads((tmp_path / "yaml" / f"{name}.yaml").read_text())  # JSON is valid YAML
    assert name == "local_mc" and config["output_type"] == "multiple_choice"
    assert config["dataset_kwargs"]["data_files"]["test"] == str((folder / "mc.jsonl").resolve())
    fields = (config["doc_to_text"], config["doc_to_choice"], config["doc_to_target"])
    assert fields == ("query", "choices", "gold")
    wino = B.task_config(folder / "wino.jsonl")
    assert (wino["doc_to_text"], wino["doc_to_choice"]) == ("gold", "context_options")
    assert B.task_config(folder / "compl.jsonl")["output_type"] == "loglikelihood"


@pytest.mark.slow  # a full lm-eval run (~17 s): in the slow tier, which CI runs too
@needs_lm_eval
def test_lm_eval_agrees_with_native_scores(tmp_path, offline):
    model_dir = save_tiny(tmp_path / "model")
    folder = write_tasks(tmp_path / "tasks")
    out = B.run_lm_eval(model_dir, "mc,wino,compl", task_dir=folder, batch_size=4, device="cpu",
                        log_samples=True, dtype="float32")
    model, tok = tiny_model(), tiny_tokenizer()
    for name, key in (("mc", "local_mc"), ("wino", "local_wino"), ("compl", "local_compl")):
        native = T.score_task(model, tok, name, task_dir=folder, progress=False, keep_items=True)
        lm = out["results"][key]
        assert lm["acc"] == pytest.approx(native["acc"]), name
        if "acc_norm" in native:
            assert lm["acc_norm"] == pytest.approx(native["acc_norm"]), name
        if "ppl" in native:
            assert lm["perplexity"] == pytest.approx(native["ppl"], rel=1e-4)
        # per item, per choice: the same log-likelihoods (lm-eval logs its requests in document order)
        samples = sorted(out["samples"][key], key=lambda s: s["doc_id"])
        assert len(samples) == len(native["items"]), name
        for s, item in zip(samples, native["items"], strict=True):
            lls = [r[0] for r in s["filtered_resps"]]  # (loglikelihood, is_greedy) per choice
            assert lls == pytest.approx(item["loglikelihoods"], rel=1e-4, abs=1e-3), name


@needs_lm_eval
@pytest.mark.skipif(not SHARED_EVAL.is_dir(),
                    reason=f"{SHARED_EVAL} is absent (real eval items live in ../shared)")
def test_lm_eval_cli_on_a_model_folder(tmp_path):
    model_dir = save_tiny(tmp_path / "model")
    name = B.write_task_yaml(SHARED_EVAL / "copa.jsonl", tmp_path / "yaml")
    env = {**os.environ, **OFFLINE, "HF_DATASETS_CACHE": str(tmp_path / "hf-datasets")}
    lm_eval_cli = Path(sys.executable).with_name("lm_eval")
    cmd = [str(lm_eval_cli), "--model", "hf", "--model_args", f"pretrained={model_dir},dtype=float32",
           "--tasks", name, "--include_path", str(tmp_path / "yaml"), "--limit", "4", "--device", "cpu",
           "--batch_size", "4", "--output_path", str(tmp_path / "out")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result_files = list((tmp_path / "out").rglob("results*.json"))
    assert result_files, f"lm_eval wrote no results file; stdout: {proc.stdout[-2000:]}"
    results = json.loads(result_files[0].read_text())["results"][name]
    native = T.score_task(tiny_model(), tiny_tokenizer(), "copa", limit=4, task_dir=SHARED_EVAL,
                          progress=False)
    assert results["acc,none"] == pytest.approx(native["acc"])
    assert results["acc_norm,none"] == pytest.approx(native["acc_norm"])
