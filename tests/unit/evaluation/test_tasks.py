import json
import math
from pathlib import Path

import pytest
import torch
from tiny_models import tiny_model, tiny_tokenizer

from drpruning.evaluation import tasks as T

SHARED_EVAL = Path(__file__).resolve().parents[2] / "shared" / "eval"
needs_shared = pytest.mark.skipif(not SHARED_EVAL.is_dir(),
                                  reason=f"{SHARED_EVAL} is absent (real evaluation items live in ../shared)")


@pytest.fixture(scope="module")
def model_tok():
    return tiny_model(), tiny_tokenizer()


def direct_ll(model, tok, context: str, continuation: str) -> tuple[float, bool]:
    """Independent: the char tokenizer makes ids(context + continuation) = ids(context) + ids(continuation);
    one unbatched, unpadded forward per continuation token."""
    ctx = tok(context)["input_ids"]
    cont = tok(continuation)["input_ids"]
    total, greedy = 0.0, True
    with torch.no_grad():
        for j, target in enumerate(cont):
            logits = model(input_ids=torch.tensor([ctx + cont[:j]])).logits[0, -1].double()
            total += float(torch.log_softmax(logits, -1)[target])
            greedy &= int(logits.argmax()) == target
    return total, greedy


def write_jsonl(path: Path, items: list[dict]) -> Path:
    path.write_text("".join(json.dumps(i) + "\n" for i in items))
    return path


def test_loglikelihoods_equal_unbatched_loop(model_tok):
    model, tok = model_tok
    requests = [("The cat sat", " on the mat."), ("A", " b"), ("Why is the sky", " blue?"),
                ("x y z w v u", " t"), ("ends with space ", "x")]
    # padded batches of mixed length
    got = T.loglikelihoods(model, tok, requests, batch_size=3, progress=False)
    for (ctx, cont), (ll, greedy, n) in zip(requests, got, strict=True):
        if ctx.endswith(" "):  # lm-eval moves the context's trailing space to the continuation
            ctx, cont = ctx[:-1], " " + cont
        ref_ll, ref_greedy = direct_ll(model, tok, ctx, cont)
        assert ll == pytest.approx(ref_ll, rel=1e-5, abs=1e-4)
        assert greedy == ref_greedy and n == len(cont)


def test_greedy_flag_true_for_the_models_own_continuation(model_tok):
    model, tok = model_tok
    for prompt in ["Hello", "abc", "The", "xyz", "Q:", "1 2 3", "zebra", "mmm"]:
        ids = tok(prompt)["input_ids"]
        with torch.no_grad():
            for _ in range(3):
                ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
        greedy_text = tok.decode(ids[-3:])
        if tok(greedy_text)["input_ids"] == ids[-3:]:  # greedy tokens are text (not <pad>/<unk>)
            break
    else:
        pytest.fail("no prompt whose greedy continuation is plain text; add prompts")
    other = greedy_text[:-1] + ("!" if greedy_text[-1] != "!" else "?")  # last token not the argmax
    (_, yes, _), (_, no, _) = T.loglikelihoods(model, tok, [(prompt, greedy_text), (prompt, other)],
                                               progress=False)
    assert yes and not no


def test_encode_pair_moves_trailing_space():
    tok = tiny_tokenizer()
    ctx, cont = T.encode_pair(tok, "ab ", "c")
    assert tok.decode(ctx) == "ab" and tok.decode(cont) == " c"
    ctx, cont = T.encode_pair(tok, "", "c")  # empty context: BOS as the context, as lm-eval does
    assert ctx == [tok.bos_token_id] and tok.decode(cont) == "c"


def test_acc_norm_divides_by_characters(tmp_path, monkeypatch):
    # by hand: lls -2 and -4 over choices of 1 and 4 characters. acc picks 0; acc_norm -2/1 < -4/4 picks 1
    path = write_jsonl(tmp_path / "t.jsonl", [{"query": "q", "choices": ["a", "bbbb"], "gold": 1},
                                              {"query": "q", "choices": ["a", "bbbb"], "gold": 0}])
    monkeypatch.setattr(T, "loglikelihoods", lambda *a, **k: [(-2.0, False, 1), (-4.0, False, 4)] * 2)
    r = T.score_task(None, None, str(path), progress=False)
    assert (r["acc"], r["acc_norm"], r["n"]) == (0.5, 0.5, 2)
    r = T.score_task(None, None, str(path), limit=1, progress=False)
    assert (r["acc"], r["acc_norm"], r["n"]) == (0.0, 1.0, 1)


def test_choice_and_winogrande_scores_match_direct(tmp_path, model_tok):
    model, tok = model_tok
    choice = [{"query": "Q: 2+2?", "choices": ["4", "five", "22"], "gold": 0},
              {"query": "Sky is", "choices": ["blue.", "green grass"], "gold": 1},
              {"query": "A, B,", "choices": ["C", "D", "E!", "zz"], "gold": 2}]
    wino = [{"context_options": ["Tom hit Bob so Tom", "Tom hit Bob so Bob"], "continuation": "cried.",
             "gold": 1},
            {"context_options": ["It is a", "It is an"], "continuation": "apple", "gold": 0}]
    r = T.score_task(model, tok, str(write_jsonl(tmp_path / "c.jsonl", choice)), batch_size=2, progress=False,
                     keep_items=True)
    acc = acc_norm = 0
    for item, got in zip(choice, r["items"], strict=True):
        lls = [direct_ll(model, tok, item["query"], " " + c)[0] for c in item["choices"]]
        assert got["loglikelihoods"] == pytest.approx(lls, rel=1e-5, abs=1e-4)
        acc += max(range(len(lls)), key=lls.__getitem__) == item["gold"]
        norm = [ll / len(c) for ll, c in zip(lls, item["choices"], strict=True)]
        acc_norm += max(range(len(norm)), key=norm.__getitem__) == item["gold"]
    assert r["acc"] == pytest.approx(acc / 3) and r["acc_norm"] == pytest.approx(acc_norm / 3)
    r = T.score_task(model, tok, str(write_jsonl(tmp_path / "w.jsonl", wino)), progress=False,
                     keep_items=True)
    assert r["shape"] == "winogrande" and "acc_norm" not in r
    acc = 0
    for item, got in zip(wino, r["items"], strict=True):
        lls = [direct_ll(model, tok, c, " " + item["continuation"])[0] for c in item["context_options"]]
        assert got["loglikelihoods"] == pytest.approx(lls, rel=1e-5, abs=1e-4)
        acc += max(range(2), key=lls.__getitem__) == item["gold"]
    assert r["acc"] == pytest.approx(acc / 2)


def test_completion_perplexity(tmp_path, model_tok):
    model, tok = model_tok
    items = [{"context": "Once upon a", "continuation": "time"},
             {"context": "Hello", "continuation": "world"}]
    r = T.score_task(model, tok, str(write_jsonl(tmp_path / "l.jsonl", items)), progress=False)
    lls = [direct_ll(model, tok, i["context"], " " + i["continuation"]) for i in items]
    assert r["ppl"] == pytest.approx(math.exp(-sum(v for v, _ in lls) / 2), rel=1e-4)
    assert r["token_ppl"] == pytest.approx(math.exp(-sum(v for v, _ in lls) / (5 + 6)), rel=1e-4)
    assert r["acc"] == sum(g for _, g in lls) / 2


def test_fewshot_prompt_construction(tmp_path, monkeypatch):
    items = [{"query": f"Q{i}", "choices": [f"a{i}", f"b{i}"], "gold": i % 2} for i in range(6)]
    prefix = T.fewshot_prefix("choice", items, 2, 3)
    examples = prefix.split("\n\n")
    assert examples[-1] == "" and len(examples) == 4  # each example ends with a blank line
    for ex in examples[:3]:
        i = int(ex.split()[0][1:])
        assert i != 2 and ex == f"Q{i} {items[i]['choices'][items[i]['gold']]}"
    assert len(set(examples[:3])) == 3
    assert T.fewshot_prefix("choice", items, 2, 3) == prefix  # deterministic
    assert T.fewshot_prefix("choice", items, 2, 0) == ""
    wino = {"context_options": ["x A", "x B"], "continuation": "end.", "gold": 1}
    assert T.example_text("winogrande", wino) == "x B end."
    assert T.example_text("completion", {"context": "c", "continuation": "w"}) == "c w"
    with pytest.raises(T.TaskError, match="num_fewshot=6"):
        T.fewshot_prefix("choice", items, 0, 6)

    seen = []
    monkeypatch.setattr(T, "loglikelihoods", lambda m, t, reqs, *a, **k: seen.extend(reqs) or
                        [(0.0, False, 1)] * len(reqs))
    T.score_task(None, None, str(write_jsonl(tmp_path / "f.jsonl", items)), num_fewshot=2, limit=2,
                 progress=False)
    assert [c for c, _ in seen[:2]] == [T.fewshot_prefix("choice", items, 0, 2) + "Q0"] * 2
    assert [c for _, c in seen[:2]] == [" a0", " b0"]
    assert seen[2][0].endswith("\n\nQ1") and "Q1 " not in seen[2][0]


def test_errors(tmp_path):
    write_jsonl(tmp_path / "good.jsonl", [{"context": "a", "continuation": "b"}])
    with pytest.raises(T.TaskError, match=r"unknown task 'nope'.*Known tasks in .*: good"):
        T.resolve_task("nope", tmp_path)
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"question": "a", "answer": "b"}])
    with pytest.raises(T.TaskError, match=r"match no task shape; accepted JSONL shapes: \{\"query\""):
        T.load_task(bad)
    mixed = write_jsonl(tmp_path / "mixed.jsonl", [{"context": "a", "continuation": "b"},
                                                   {"query": "q", "choices": ["a"], "gold": 0}])
    with pytest.raises(T.TaskError, match="has shape 'choice' but the file starts with 'completion'"):
        T.load_task(mixed)
    with pytest.raises(T.TaskError, match="does not exist"):
        T.resolve_task(str(tmp_path / "missing.jsonl"))
    with pytest.raises(T.TaskError, match="unknown task"):  # checked before any scoring starts
        T.evaluate_tasks(None, None, ["good", "nope"], task_dir=tmp_path)


@needs_shared
def test_shared_task_files_have_the_documented_shapes():
    expected = {"arc_easy": "choice", "piqa": "choice", "boolq": "choice", "copa": "choice",
                "openbook_qa": "choice", "logi_qa": "choice", "siqa": "choice", "winogrande": "winogrande",
                "lambada_openai": "completion"}
    for name, shape in expected.items():
        got, items = T.load_task(T.resolve_task(name, SHARED_EVAL))
        assert got == shape, name
        assert items


@needs_shared
def test_copa_from_shared_matches_direct(model_tok):
    model, tok = model_tok
    r = T.score_task(model, tok, "copa", limit=4, task_dir=SHARED_EVAL, progress=False, keep_items=True)
    _, items = T.load_task(SHARED_EVAL / "copa.jsonl")
    for item, got in zip(items[:4], r["items"], strict=True):
        lls = [direct_ll(model, tok, item["query"], " " + c)[0] for c in item["choices"]]
        assert got["loglikelihoods"] == pytest.approx(lls, rel=1e-5, abs=1e-4)
