"""Caption refiner: a scripted OpenAI-compatible server on localhost, a tiny random transformers LM, the CLI."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from usclip.cli import main as cli_main
from usclip.refine import (
    STATUSES,
    BackendError,
    CaptionRefiner,
    ClipTokenCounter,
    OpenAICompatibleBackend,
    cut_to_fit,
    refine_file,
    summary_path,
)
from usclip.refine.prompts import clean_answer
from usclip.refine.tokens import split_sentences

LIMIT = 77
COUNT = ClipTokenCounter()

CAPTIONS = {
    "1": "左乳低回声结节，形态不规则，边缘模糊，BI-RADS 4a类。",
    "2": "甲状腺右叶实性低回声结节，纵横比大于1，可见微钙化，TI-RADS 5类。",
    "3": "右乳无回声囊肿，边界清，后方回声增强，BI-RADS 2类。",
}
SHORT = {
    "1": "Left breast hypoechoic nodule, irregular shape, indistinct margins, BI-RADS 4a.",
    "2": "Right thyroid lobe solid hypoechoic nodule, taller than wide, microcalcifications, TI-RADS 5.",
    "3": "Right breast anechoic cyst, circumscribed margins, posterior enhancement, BI-RADS 2.",
}
# Five sentences, each well under the limit, together far over it.
LONG = (
    "The examination of the left breast shows a solid hypoechoic nodule in the upper outer quadrant. "
    "The nodule has an irregular shape and indistinct, angular margins along its lateral border. "
    "Several punctate echogenic foci consistent with microcalcifications are seen within the lesion. "
    "There is posterior acoustic shadowing and increased internal vascularity on color Doppler. "
    "Overall the findings are suspicious and the lesion is classified as BI-RADS category 4a."
)


def chat(content: str) -> tuple[int, Any]:
    return 200, {"choices": [{"index": 0, "message": {"role": "assistant", "content": content}}]}


class FakeLLM:
    """A scripted ``/v1/chat/completions`` server: ``script(body, n)`` -> (status, JSON, str or bytes[, headers])."""

    def __init__(self, script: Callable[[dict[str, Any], int], tuple]) -> None:
        self.script = script
        self.requests: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        llm = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self.path != "/v1/chat/completions":
                    self.send_error(404)
                    return
                llm.requests.append(body)
                llm.headers.append(dict(self.headers))
                status, payload, *extra = llm.script(body, len(llm.requests))
                data = (
                    payload
                    if isinstance(payload, bytes)
                    else (payload.encode() if isinstance(payload, str) else json.dumps(payload).encode())
                )
                self.send_response(status)
                for k, v in (extra[0] if extra else {}).items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.handle_error = lambda *args: None  # a client that timed out closed the socket: expected
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()
        self.base_url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def captions(self) -> list[str]:
        """The caption (first user message) of each request."""
        return [r["messages"][1]["content"] for r in self.requests]


@pytest.fixture
def fake_llm() -> Iterator[Callable[..., FakeLLM]]:
    servers: list[FakeLLM] = []

    def start(script: Callable[[dict[str, Any], int], tuple]) -> FakeLLM:
        servers.append(FakeLLM(script))
        return servers[-1]

    yield start
    for s in servers:
        s.server.shutdown()
        s.server.server_close()


def caption_of(body: dict[str, Any]) -> str:
    return body["messages"][1]["content"]


def id_of(body: dict[str, Any]) -> str:
    return next(k for k, v in CAPTIONS.items() if v == caption_of(body))


def translate(body: dict[str, Any], n: int) -> tuple:
    return chat(SHORT[id_of(body)])


def write_input(path: Path, captions: dict[str, str] = CAPTIONS, **extra: Any) -> Path:
    path.write_text(
        "".join(json.dumps({"id": k, "caption": v, **extra}, ensure_ascii=False) + "\n" for k, v in captions.items())
    )
    return path


def read_output(path: Path) -> list[dict[str, Any]]:
    records = [json.loads(line) for line in path.read_text().splitlines()]
    for r in records:  # every output fits by the real tokenizer, and says so
        assert COUNT(r["caption"]) == r["tokens"] <= LIMIT
        assert r["status"] in STATUSES
    return records


class Sleeps(list):
    def __call__(self, seconds: float) -> None:
        self.append(seconds)


def make_refiner(llm: FakeLLM, sleeps: Sleeps | None = None, **kwargs: Any) -> CaptionRefiner:
    backend = OpenAICompatibleBackend(llm.base_url, "qwen3-8b", timeout=kwargs.pop("timeout", 10.0))
    return CaptionRefiner(backend, sleep=sleeps if sleeps is not None else Sleeps(), **kwargs)


# ---------------------------------------------------------------------------------------------- token counting, cut


def test_counter_counts_bpe_plus_start_and_end_without_truncation():
    import open_clip

    tokenizer = open_clip.get_tokenizer("ViT-B-16")
    assert COUNT("") == 2
    assert COUNT(SHORT["1"]) == len(tokenizer.encode(SHORT["1"])) + 2
    long = " ".join([LONG] * 3)
    assert COUNT(long) > 3 * LIMIT  # not truncated to the context


def test_cut_at_last_sentence_boundary_that_fits():
    cut = cut_to_fit(LONG, LIMIT, COUNT)
    sentences = split_sentences(LONG)
    assert len(sentences) == 5
    k = len(split_sentences(cut))
    assert cut == " ".join(sentences[:k]) and cut.endswith(".")
    assert COUNT(cut) <= LIMIT < COUNT(" ".join(sentences[: k + 1]))


def test_cut_falls_back_to_words_then_characters():
    words = "hypoechoic irregular nodule with angular margins " * 20  # one sentence, no boundary
    cut = cut_to_fit(words, 30, COUNT)
    assert COUNT(cut) <= 30 and cut.endswith(".")
    assert words.startswith(cut[:-1]) and COUNT(cut[:-1] + " hypoechoic") > 29
    cjk = "低回声结节" * 40  # no spaces, no sentence end
    cut = cut_to_fit(cjk, LIMIT, COUNT)
    assert cjk.startswith(cut) and 0 < COUNT(cut) <= LIMIT
    assert cut_to_fit("  fits  already. ", LIMIT, COUNT) == "fits already."


def test_clean_answer_strips_thinking_labels_and_quotes():
    assert clean_answer('<think>\nlet me see\n</think>\n\nCaption: "Left breast cyst,\nBI-RADS 2."') == (
        "Left breast cyst, BI-RADS 2."
    )
    assert clean_answer("<think>never finished") == ""


# ------------------------------------------------------------------------------------------------ the HTTP backend


def test_normal_answers(tmp_path, fake_llm):
    llm = fake_llm(translate)
    src, out = write_input(tmp_path / "in.jsonl", image="x.png"), tmp_path / "out.jsonl"
    summary = refine_file(src, out, make_refiner(llm), progress=False)
    records = read_output(out)
    assert [r["id"] for r in records] == ["1", "2", "3"]
    for r in records:
        assert r["caption"] == SHORT[r["id"]] and r["original"] == CAPTIONS[r["id"]] and r["image"] == "x.png"
        assert (r["status"], r["attempts"]) == ("ok", 1)
        assert r["original_tokens"] == COUNT(CAPTIONS[r["id"]])
    body = llm.requests[0]
    assert body["model"] == "qwen3-8b" and body["temperature"] == 0
    assert [m["role"] for m in body["messages"]] == ["system", "user"]
    assert "77 CLIP tokens" in body["messages"][0]["content"] and "English" in body["messages"][0]["content"]
    assert (summary.total, summary.refined, summary.failed, summary.cut, summary.retried_for_length) == (3, 3, 0, 0, 0)
    assert summary.shortened == sum(COUNT(SHORT[k]) < COUNT(v) for k, v in CAPTIONS.items())
    saved = json.loads(summary_path(out).read_text())
    assert summary_path(out).name == "out.summary.json" and saved["refined"] == 3 and saved["failed_ids"] == []


def test_too_long_answer_gets_a_stricter_retry(tmp_path, fake_llm):
    llm = fake_llm(lambda body, n: chat(LONG if len(body["messages"]) == 2 else SHORT["1"]))
    src, out = write_input(tmp_path / "in.jsonl", {"1": CAPTIONS["1"]}), tmp_path / "out.jsonl"
    summary = refine_file(src, out, make_refiner(llm), progress=False)
    (record,) = read_output(out)
    assert (record["caption"], record["status"], record["attempts"]) == (SHORT["1"], "retried", 2)
    first, second = llm.requests
    assert second["messages"][:2] == first["messages"]  # same instruction and caption, then the too-long answer
    assert second["messages"][2] == {"role": "assistant", "content": LONG}
    strict = second["messages"][3]
    assert strict["role"] == "user"
    assert f"{COUNT(LONG)} CLIP tokens" in strict["content"] and "limit is 77 tokens" in strict["content"]
    assert (summary.retried_for_length, summary.cut, summary.shortened) == (1, 0, 1)


def test_always_too_long_is_cut_at_a_sentence_boundary(tmp_path, fake_llm):
    llm = fake_llm(lambda body, n: chat(LONG))
    src, out = write_input(tmp_path / "in.jsonl", {"1": CAPTIONS["1"]}), tmp_path / "out.jsonl"
    summary = refine_file(src, out, make_refiner(llm, length_retries=2), progress=False)
    (record,) = read_output(out)
    assert (record["status"], record["attempts"]) == ("cut", 3) and len(llm.requests) == 3
    assert record["caption"] == cut_to_fit(LONG, LIMIT, COUNT) and record["caption"].endswith(".")
    assert LONG.startswith(record["caption"]) and record["tokens"] <= LIMIT
    assert (summary.cut, summary.retried_for_length, summary.failed) == (1, 1, 0)


def test_limit_is_configurable(tmp_path, fake_llm):
    llm = fake_llm(translate)
    src, out = write_input(tmp_path / "in.jsonl"), tmp_path / "out.jsonl"
    refine_file(src, out, make_refiner(llm, max_tokens=12, length_retries=0), progress=False)
    assert "12 CLIP tokens" in llm.requests[0]["messages"][0]["content"]
    for r in (json.loads(line) for line in out.read_text().splitlines()):
        assert r["status"] == "cut" and COUNT(r["caption"]) == r["tokens"] <= 12


@pytest.mark.parametrize(
    ("failure", "delay"),
    [
        ((500, {"error": "boom"}), 1.0),
        ((429, {"error": "slow down"}, {"Retry-After": "7"}), 7.0),
        ((200, "not json"), 1.0),
        ((200, {"choices": []}), 1.0),
        ((200, {"choices": [{"message": {"content": "   "}}]}), 1.0),  # empty answer
    ],
)
def test_transient_error_then_success_backs_off(tmp_path, fake_llm, failure, delay):
    llm = fake_llm(lambda body, n: failure if n == 1 else translate(body, n))
    src, out = write_input(tmp_path / "in.jsonl", {"1": CAPTIONS["1"]}), tmp_path / "out.jsonl"
    sleeps = Sleeps()
    summary = refine_file(src, out, make_refiner(llm, sleeps, backoff=1.0), progress=False)
    (record,) = read_output(out)
    assert (record["caption"], record["status"], record["attempts"]) == (SHORT["1"], "ok", 1)
    assert sleeps == [delay] and len(llm.requests) == 2
    assert (summary.request_retries, summary.failed) == (1, 0)


def test_timeout_is_retried(tmp_path, fake_llm):
    def slow_first(body, n):
        if n == 1:
            time.sleep(0.5)
        return translate(body, n)

    llm = fake_llm(slow_first)
    src, out = write_input(tmp_path / "in.jsonl", {"1": CAPTIONS["1"]}), tmp_path / "out.jsonl"
    summary = refine_file(src, out, make_refiner(llm, timeout=0.1), progress=False)
    assert read_output(out)[0]["caption"] == SHORT["1"] and summary.request_retries == 1


def test_connection_refused_is_retryable():
    with socket.socket() as sock:  # a free port that nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    backend = OpenAICompatibleBackend(f"http://127.0.0.1:{port}/v1", "m", timeout=2)
    with pytest.raises(BackendError, match="cannot reach") as err:
        backend.complete([{"role": "user", "content": "x"}])
    assert err.value.retryable and not err.value.fatal


def test_always_failing_caption_is_not_written_and_a_rerun_retries_it(tmp_path, fake_llm):
    healthy = threading.Event()

    def script(body, n):
        return (500, {"error": "down"}) if id_of(body) == "2" and not healthy.is_set() else translate(body, n)

    llm = fake_llm(script)
    src, out = write_input(tmp_path / "in.jsonl"), tmp_path / "out.jsonl"
    sleeps = Sleeps()
    summary = refine_file(src, out, make_refiner(llm, sleeps, retries=3, backoff=0.5), progress=False)
    assert [r["id"] for r in read_output(out)] == ["1", "3"]
    assert llm.captions().count(CAPTIONS["2"]) == 4 and sleeps == [0.5, 1.0, 2.0]  # 1 + 3 retries, doubling
    assert (summary.failed, summary.failed_ids, summary.refined) == (1, ["2"], 2)
    assert json.loads(summary_path(out).read_text())["failed_ids"] == ["2"]

    healthy.set()
    before = out.read_bytes()
    summary = refine_file(src, out, make_refiner(llm), progress=False)
    assert (summary.done_before, summary.refined, summary.failed) == (2, 1, 0)
    assert out.read_bytes().startswith(before)
    assert [r["id"] for r in read_output(out)] == ["1", "3", "2"]


def test_fatal_http_error_stops_the_run(tmp_path, fake_llm):
    llm = fake_llm(lambda body, n: (401, {"error": "bad key"}))
    src, out = write_input(tmp_path / "in.jsonl"), tmp_path / "out.jsonl"
    with pytest.raises(BackendError, match="HTTP 401") as err:
        refine_file(src, out, make_refiner(llm), progress=False)
    assert err.value.fatal and len(llm.requests) == 1 and out.read_text() == ""


class StopAfter:
    """A backend that dies (like a killed process) on call ``k + 1``."""

    def __init__(self, backend: OpenAICompatibleBackend, k: int) -> None:
        self.backend, self.k, self.calls = backend, k, 0

    def complete(self, messages):
        self.calls += 1
        if self.calls > self.k:
            raise RuntimeError("killed")
        return self.backend.complete(messages)


def test_interrupted_run_resumes_without_duplicates_or_losses(tmp_path, fake_llm):
    captions = {str(i): f"{CAPTIONS[str(i % 3 + 1)]} 病例{i}" for i in range(1, 8)}
    llm = fake_llm(lambda body, n: chat(f"Case {caption_of(body).rsplit('病例', 1)[1]}: hypoechoic nodule, BI-RADS 3."))
    src, out = write_input(tmp_path / "in.jsonl", captions), tmp_path / "out.jsonl"
    backend = OpenAICompatibleBackend(llm.base_url, "m")
    with pytest.raises(RuntimeError, match="killed"):
        refine_file(src, out, CaptionRefiner(StopAfter(backend, 3)), progress=False)
    finished = out.read_bytes()
    assert finished.count(b"\n") == 3
    with out.open("ab") as f:  # killed in the middle of writing record 4
        f.write(b'{"id": "4", "original": "\xe5\xb7\xa6\xe4\xb9')

    summary = refine_file(src, out, CaptionRefiner(backend), progress=False)
    assert (summary.total, summary.done_before, summary.refined, summary.failed) == (7, 3, 4, 0)
    assert out.read_bytes().startswith(finished)  # finished lines byte-identical
    records = read_output(out)
    assert [r["id"] for r in records] == list(captions)  # one per id, none lost, input order
    assert all(r["caption"] == f"Case {r['id']}: hypoechoic nodule, BI-RADS 3." for r in records)
    assert len(llm.requests) == 7

    again = refine_file(src, out, CaptionRefiner(backend), progress=False)  # all done: nothing to do
    assert (again.done_before, again.refined) == (7, 0) and len(llm.requests) == 7


def test_skip_fitting_english_keeps_them_without_a_request(tmp_path, fake_llm):
    llm = fake_llm(translate)
    captions = {"1": CAPTIONS["1"], "9": "Right breast simple cyst, BI-RADS 2."}
    src, out = write_input(tmp_path / "in.jsonl", captions), tmp_path / "out.jsonl"
    summary = refine_file(src, out, make_refiner(llm, skip_fitting_english=True), progress=False)
    kept = {r["id"]: r for r in read_output(out)}
    assert (kept["9"]["status"], kept["9"]["attempts"], kept["9"]["caption"]) == ("kept", 0, captions["9"])
    assert kept["1"]["status"] == "ok" and llm.captions() == [CAPTIONS["1"]] and summary.kept == 1


# ------------------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    ("lines", "match"),
    [
        (['{"id": "1", "caption": "a"}', '{"id": "2"}'], r"in\.jsonl:2: key 'caption' missing"),
        (['{"caption": "a"}'], r"in\.jsonl:1: key 'id' missing"),
        (['{"id": "1", "caption": "a"}', '{"id": "1", "caption": "b"}'], r"in\.jsonl:2: duplicate id '1'"),
        (["{not json"], r"in\.jsonl:1: expected a JSON object"),
        (['{"id": "1", "caption": ""}'], r"in\.jsonl:1: key 'caption' must be a non-empty string"),
        (['{"id": [1], "caption": "a"}'], r"in\.jsonl:1: key 'id' must be a string or an integer"),
    ],
)
def test_bad_input_names_file_line_and_key(tmp_path, lines, match):
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(lines) + "\n")
    backend = OpenAICompatibleBackend("http://127.0.0.1:9/v1", "m")
    with pytest.raises(ValueError, match=match):
        refine_file(src, tmp_path / "out.jsonl", CaptionRefiner(backend), progress=False)


def test_corrupt_finished_output_line_is_an_error_not_rewritten(tmp_path):
    src, out = write_input(tmp_path / "in.jsonl"), tmp_path / "out.jsonl"
    out.write_text('{"id": "1", "caption": "x"}\ngarbage\n')
    backend = OpenAICompatibleBackend("http://127.0.0.1:9/v1", "m")
    with pytest.raises(ValueError, match=r"out\.jsonl:2: expected a finished JSON record"):
        refine_file(src, out, CaptionRefiner(backend), progress=False)
    assert out.read_text() == '{"id": "1", "caption": "x"}\ngarbage\n'


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="base_url"):
        OpenAICompatibleBackend("localhost:8000", "m")
    backend = OpenAICompatibleBackend("http://127.0.0.1:9/v1", "m")
    with pytest.raises(ValueError, match="max_tokens"):
        CaptionRefiner(backend, max_tokens=2)


# ------------------------------------------------------------------------------------------------------------- CLI


def test_cli_refine(tmp_path, fake_llm, monkeypatch):
    llm = fake_llm(lambda body, n: (500, "down") if id_of(body) == "3" else translate(body, n))
    src, out = write_input(tmp_path / "in.jsonl"), tmp_path / "out.jsonl"
    monkeypatch.setenv("USCLIP_TEST_KEY", "sk-test")
    args = ["captions", "refine", str(src), str(out), "--base-url", llm.base_url, "--model", "qwen3-8b"]
    args += ["--api-key-env", "USCLIP_TEST_KEY", "--retries", "0", "-q"]
    args += ["--extra-body", '{"chat_template_kwargs": {"enable_thinking": false}}']
    with pytest.raises(SystemExit) as exit_:
        cli_main(args)
    assert exit_.value.code == 1  # caption 3 failed
    assert [r["id"] for r in read_output(out)] == ["1", "2"]
    assert llm.headers[0]["Authorization"] == "Bearer sk-test"
    assert llm.requests[0]["chat_template_kwargs"] == {"enable_thinking": False}
    assert json.loads(summary_path(out).read_text())["failed_ids"] == ["3"]


def test_cli_custom_keys_and_limit(tmp_path, fake_llm):
    llm = fake_llm(lambda body, n: chat(LONG))
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text(json.dumps({"image_id": 5, "text": CAPTIONS["1"]}, ensure_ascii=False) + "\n")
    args = ["captions", "refine", str(src), str(out), "--base-url", llm.base_url, "--model", "m", "-q"]
    args += ["--id-key", "image_id", "--text-key", "text", "--max-tokens", "40", "--length-retries", "1"]
    with pytest.raises(SystemExit) as exit_:
        cli_main(args)
    assert exit_.value.code == 0
    (record,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert record["image_id"] == 5 and "text" not in record and record["original"] == CAPTIONS["1"]
    assert record["status"] == "cut" and record["attempts"] == 2 and COUNT(record["caption"]) == record["tokens"] <= 40


def test_cli_errors_exit_2(tmp_path, capsys):
    src = write_input(tmp_path / "in.jsonl")
    with pytest.raises(SystemExit) as exit_:
        cli_main(["captions", "refine", str(src), str(tmp_path / "out.jsonl"), "--model", "m"])
    assert exit_.value.code == 2 and "--base-url" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        cli_main(["captions", "refine", str(tmp_path / "nope.jsonl"), str(tmp_path / "o.jsonl"), "--model", "m"])
    assert exit_.value.code == 2
    args = ["captions", "refine", str(src), str(tmp_path / "o.jsonl"), "--model", "m", "--base-url", "http://x/v1"]
    with pytest.raises(SystemExit) as exit_:
        cli_main([*args, "--api-key-env", "USCLIP_SURELY_UNSET_VAR"])
    assert exit_.value.code == 2 and "USCLIP_SURELY_UNSET_VAR" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ the transformers backend


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory) -> Path:
    """A tiny randomly initialised Llama and a word-level tokenizer trained here: no download."""
    pytest.importorskip("transformers", reason="the transformers backend needs pip install 'usclip[llm]'")
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = [*SHORT.values(), LONG, *CAPTIONS.values()]
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece()  # joins words with spaces
    tok.train_from_iterator(words, trainers.WordLevelTrainer(special_tokens=["[UNK]", "[PAD]", "[EOS]"]))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", eos_token="[EOS]")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        eos_token_id=None,  # never stops early: answers are exactly max_new_tokens long
        pad_token_id=tokenizer.pad_token_id,
    )
    path = tmp_path_factory.mktemp("tiny_lm")
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.mark.parametrize(("max_new_tokens", "status"), [(4, "ok"), (120, "cut")])
def test_transformers_backend_end_to_end(tmp_path, tiny_lm, max_new_tokens, status):
    from usclip.refine import TransformersBackend

    backend = TransformersBackend(tiny_lm, max_new_tokens=max_new_tokens, device="cpu")
    assert backend._prompt([{"role": "user", "content": "x"}]) == ("User: x\n\nAssistant:", True)  # no template
    src, out = write_input(tmp_path / "in.jsonl"), tmp_path / "out.jsonl"
    summary = refine_file(src, out, CaptionRefiner(backend, length_retries=0), progress=False)
    records = read_output(out)
    assert [r["id"] for r in records] == list(CAPTIONS) and {r["status"] for r in records} == {status}
    assert summary.refined == 3 and summary.cut == (3 if status == "cut" else 0)
    lines = out.read_text().splitlines()
    # resumable: a finished run does nothing; a new input id is the only one refined
    write_input(src, {**CAPTIONS, "4": "右乳低回声结节，BI-RADS 3类。"})
    summary = refine_file(src, out, CaptionRefiner(backend, length_retries=0), progress=False)
    assert (summary.done_before, summary.refined) == (3, 1)
    assert out.read_text().splitlines()[:3] == lines and [r["id"] for r in read_output(out)] == ["1", "2", "3", "4"]


def test_transformers_backend_uses_the_chat_template(tiny_lm, tmp_path):
    from transformers import AutoTokenizer

    from usclip.refine import TransformersBackend

    templated = tmp_path / "templated"
    tokenizer = AutoTokenizer.from_pretrained(tiny_lm)
    tokenizer.chat_template = "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} {% endfor %}<assistant>"
    tokenizer.save_pretrained(templated)
    for f in tiny_lm.iterdir():
        if not (templated / f.name).exists():
            (templated / f.name).write_bytes(f.read_bytes())
    backend = TransformersBackend(templated, max_new_tokens=3, device="cpu")
    text, special = backend._prompt([{"role": "system", "content": "s"}, {"role": "user", "content": "u"}])
    assert (text, special) == ("<system> s <user> u <assistant>", False)
    answer = backend.complete([{"role": "user", "content": "nodule"}])
    assert len(answer.split()) == 3


class _Answers:
    """A backend that gives scripted answers in order."""

    def __init__(self, *answers: str) -> None:
        self.answers = list(answers)

    def complete(self, messages):
        return self.answers.pop(0)


def test_limit_is_inclusive_at_exactly_77_clip_tokens():
    """77 tokens fit (start and end included), 78 do not: an off-by-one would let CLIP truncate silently."""
    from usclip.refine.tokens import ClipTokenCounter

    count = ClipTokenCounter()
    fits = "lesion " + "a " * 71 + "end."
    over = "lesion " + "a " * 72 + "end."
    assert (count(fits), count(over)) == (77, 78)
    refined = CaptionRefiner(_Answers(over, fits), sleep=lambda s: None).refine("原始报告")
    assert (refined.caption, refined.tokens, refined.status) == (fits, 77, "retried")
    refined = CaptionRefiner(_Answers(fits), sleep=lambda s: None).refine("原始报告")
    assert (refined.tokens, refined.status) == (77, "ok")
    refined = CaptionRefiner(_Answers(over), length_retries=0, sleep=lambda s: None).refine("原始报告")
    assert refined.status == "cut" and refined.tokens <= 77
