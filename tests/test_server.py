"""The Serve app over real HTTP: the unmodified openai client, bad input, overload, disconnect;
and the same ingress over a model server in this process, where a test can fail the engine or
hold the model server back."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import shutil
import socket
import threading
import time

import httpx
import pytest

from dflash_ray import LLM, SamplingParams

from .conftest import WHOLE
from .test_engine import add_char_tokenizer

pytestmark = pytest.mark.timeout(240)
AUTH = {"Authorization": "Bearer sekret"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(base: str, seconds: float = 120) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                return
        time.sleep(0.5)
    raise TimeoutError(f"{base} not healthy after {seconds}s")


@pytest.fixture(scope="module")
def text_models(tiny, tmp_path_factory):
    d = tmp_path_factory.mktemp("served") / "moe"
    shutil.copytree(tiny["moe"], d)
    add_char_tokenizer(d)
    return str(d), tiny["drafter"]


@pytest.fixture(scope="module")
def served(ray_cluster, text_models):
    from ray import serve

    from dflash_ray.server.app import build_app

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    target, drafter = text_models
    app = build_app({
        "model_name": "tiny",
        "engine": {"target": target, "drafter": drafter, "max_model_len": 512, **WHOLE},
        "ingress": {"max_body_bytes": 4096, "request_timeout_s": 30, "body_timeout_s": 2},
    })
    serve.run(app, name="dflash", route_prefix="/", blocking=False)
    base = f"http://127.0.0.1:{port}"
    wait_healthy(base)
    yield base
    serve.delete("dflash")
    serve.shutdown()  # a later module's serve.start must get its own HTTP port


def test_openai_client_completions_and_chat_equal_offline(served, text_models):
    import openai

    client = openai.OpenAI(base_url=f"{served}/v1", api_key="unused")
    llm = LLM(*text_models, **WHOLE)
    want = llm.generate("hello world", SamplingParams(max_tokens=24), use_tqdm=False)[0]

    got = client.completions.create(model="tiny", prompt="hello world", max_tokens=24,
                                    temperature=0)
    assert got.choices[0].text == want.text
    assert got.usage.completion_tokens == 24
    assert got.usage.model_extra["acceptance_length"] >= 1.0

    stream = client.completions.create(model="tiny", prompt="hello world", max_tokens=24,
                                       temperature=0, stream=True,
                                       stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want.text
    assert chunks[-1].usage.completion_tokens == 24

    chat = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=16,
        temperature=0)
    prompt = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    offline = llm.generate(prompt, SamplingParams(max_tokens=16), use_tqdm=False)[0]
    assert chat.choices[0].message.content == offline.text
    parts = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=16,
        temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in parts) == offline.text
    assert [m.id for m in client.models.list().data] == ["tiny"]

    # stop_token_ids (vLLM's extension) reaches the engine: it stops at that token, kept
    stop = want.token_ids[10]
    cut = llm.generate("hello world", SamplingParams(max_tokens=24, stop_token_ids=[stop]),
                       use_tqdm=False)[0]
    assert cut.finish_reason == "stop" and len(cut.token_ids) < 24
    got = client.completions.create(model="tiny", prompt="hello world", max_tokens=24,
                                    temperature=0, extra_body={"stop_token_ids": [stop]})
    assert got.choices[0].text == cut.text and got.choices[0].finish_reason == "stop"
    assert got.usage.completion_tokens == len(cut.token_ids)


def test_concurrent_streams_share_engine_steps(served, text_models):
    llm = LLM(*text_models, **WHOLE)
    prompts = [f"req {i} " + "ab" * i for i in range(16)]
    want = [o.text for o in llm.generate(prompts, SamplingParams(max_tokens=20),
                                          use_tqdm=False)]

    async def one(client, prompt):
        body = {"model": "tiny", "prompt": prompt, "max_tokens": 20, "temperature": 0,
                "stream": True}
        text = ""
        async with client.stream("POST", f"{served}/v1/completions", json=body) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    text += json.loads(line[6:])["choices"][0]["text"]
        return text

    async def main():
        async with httpx.AsyncClient(timeout=60) as client:
            return await asyncio.gather(*(one(client, p) for p in prompts))

    before = httpx.get(f"{served}/stats").json()
    assert asyncio.run(main()) == want
    stats = httpx.get(f"{served}/stats").json()
    assert stats["max_batch_size"] > 1 and 0 < stats["spec_steps"] <= stats["num_steps"]
    assert stats["model_seconds"] > before["model_seconds"]  # the steps' time in the model
    # the deltas came as pushed streams (the default): every request pushed its items
    assert stats["pushed_items"] - before["pushed_items"] >= len(prompts)
    assert 0 < stats["pushed_frames"] - before["pushed_frames"] <= stats["pushed_items"]


def openai_error(r: httpx.Response, status: int) -> dict:
    """The body of an error response: OpenAI's shape, a request id, no traceback."""
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert {"message", "type", "param", "code"} <= set(err) and err["message"], err
    assert err["request_id"] and "Traceback" not in err["message"], err
    return err


@pytest.mark.parametrize(
    "body,status,field",
    [
        ('{"prompt": "hi", "max_tokens": ', 400, None),  # malformed JSON
        ({"prompt": "hi", "max_tokens": "many"}, 400, "max_tokens"),
        ({"prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
        ({"prompt": "hi", "temperature": -1}, 400, "temperature"),
        ({"prompt": "hi", "top_p": 2}, 400, "top_p"),
        ({"prompt": "hi", "model": "gpt-9"}, 404, "model"),
        ({"prompt": "x" * 600, "max_tokens": 4}, 400, "prompt"),  # alone over max_model_len
        ({"prompt": "x" * 500, "max_tokens": 100}, 400, "max_tokens"),  # fits, 500+100 not
        ({"prompt": ""}, 400, "prompt"),
        ({"prompt": "hi", "logprobs": 3}, 400, "logprobs"),
        ({"prompt": "y" * 5000}, 413, None),
        ({"prompt": "\ud800"}, 400, "prompt"),  # a lone surrogate: the tokenizer raised
        ({"prompt": "\ud800", "stream": True}, 400, "prompt"),
        ({"prompt": [True, False]}, 400, "prompt"),  # booleans are not token ids
        ({"prompt": "hi", "seed": "7"}, 400, "seed"),
        ({"prompt": "hi", "ignore_eos": "yes"}, 400, "ignore_eos"),
        ({"prompt": "hi", "stream_options": {"include_usage": True}}, 400, "stream_options"),
        ({"prompt": "hi", "presence_penalty": 0.5}, 400, "presence_penalty"),
        ({"prompt": "hi", "frequency_penalty": 1}, 400, "frequency_penalty"),
        ({"prompt": "hi", "repetition_penalty": 1.2}, 400, "repetition_penalty"),
        ({"prompt": "hi", "min_tokens": 2}, 400, "min_tokens"),
        ({"prompt": "hi", "echo": True}, 400, "echo"),
        ({"prompt": "hi", "max_token": 3}, 400, "max_token"),  # unknown: refused, not ignored
        ({"prompt": "hi", "stop": ["\udfff"]}, 400, "stop[0]"),
    ],
)
def test_bad_input_is_rejected_naming_the_field(served, body, status, field):
    content = body if isinstance(body, str) else json.dumps(body)
    r = httpx.post(f"{served}/v1/completions", content=content,
                   headers={"content-type": "application/json"}, timeout=30)
    err = openai_error(r, status)
    if field is not None:
        assert err["param"] == field and field.split("[")[0] in err["message"], err


@pytest.mark.parametrize(
    "extra,field,says",
    [
        ({"stop": [f"s{i}" for i in range(17)]}, "stop", "17 strings; this server allows at "
         "most 16"),  # 80k stop strings made two 256-token requests take 23 s
        ({"stop": ["ok", "z" * 257]}, "stop[1]", "257 characters; this server allows at most "
         "256"),
        ({"stop": "z" * 257}, "stop", "at most 256"),
        ({"stop_token_ids": list(range(257))}, "stop_token_ids", "at most 256"),
        ({"n": 17}, "n", "between 1 and 16"),
    ],
)
def test_a_request_past_a_limit_is_400_naming_the_field_and_the_limit(served, extra, field,
                                                                       says):
    r = httpx.post(f"{served}/v1/completions", json={"prompt": "hi"} | extra, timeout=30)
    err = openai_error(r, 400)
    assert err["param"] == field and says in err["message"], err


@pytest.mark.parametrize(
    "extra,field,says",
    [
        ({"messages": [{"role": "user", "content": "a\ud800"}]}, "messages[0].content",
         "surrogate"),
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": "\ud800"}]}],
          "stream": True}, "messages[0].content[0].text", "surrogate"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
         "messages[0].content[0].type", "image_url"),  # was dropped without a word
        ({"max_completion_tokens": 3, "max_tokens": 5}, "max_completion_tokens", "disagree"),
        # the prompt fits, the prompt + the budget does not: named as the request named it
        ({"max_completion_tokens": 505}, "max_completion_tokens", "max_completion_tokens (505)"),
        ({"max_tokens": 505}, "max_tokens", "max_tokens (505)"),
        ({"messages": [{"role": "user", "content": "x" * 600}]}, "messages", "messages ("),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools", "tools"),
        ({"messages": [{"role": "user", "content": "hi", "name": "bob"}]}, "messages[0].name",
         "unrecognized"),
    ],
)
def test_bad_chat_input_is_rejected_naming_the_field(served, extra, field, says):
    body = {"messages": [{"role": "user", "content": "hi"}]} | extra
    r = httpx.post(f"{served}/v1/chat/completions", content=json.dumps(body),
                   headers={"content-type": "application/json"}, timeout=30)
    err = openai_error(r, 400)
    assert err["param"] == field and says in err["message"], err
    assert "prompt" not in err["message"], err  # a chat request has messages


def test_max_completion_tokens_is_honoured(served):
    chat = {"messages": [{"role": "user", "content": "hi"}]}
    for route, body, want in [
        ("chat/completions", chat | {"max_completion_tokens": 3}, 3),  # it was ignored: 64
        ("chat/completions", chat | {"max_completion_tokens": 3, "max_tokens": 3}, 3),
        ("chat/completions", chat | {"max_tokens": 4}, 4),
        ("completions", {"prompt": "hi", "max_completion_tokens": 5}, 5),
    ]:
        r = httpx.post(f"{served}/v1/{route}", timeout=30,
                       json=body | {"temperature": 0, "ignore_eos": True})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == want, (body, r.json()["usage"])


@pytest.mark.parametrize(
    "method,path,content,headers,status,says",
    [
        ("POST", "/v1/completions", b"", {"content-type": "application/json"}, 400, "empty"),
        ("POST", "/v1/completions", b'{"prompt": "hi"}', {"content-type": "text/plain"}, 415,
         "application/json"),
        ("POST", "/v1/completions", b'{"prompt": "hi \xff"}',
         {"content-type": "application/json"}, 400, "UTF-8"),
        ("POST", "/v1/completions",
         b'{"prompt": "hi", "logit_bias": ' + b"[" * 1900 + b"]" * 1900 + b"}",
         {"content-type": "application/json"}, 400, "nested"),
        ("POST", "/v1/completions", b"[1, 2]", {"content-type": "application/json"}, 400,
         "JSON object"),
        ("GET", "/v1/nothing", b"", {}, 404, "/v1/completions"),
        ("GET", "/v1/completions", b"", {}, 405, "POST"),
    ],
    ids=["empty", "text/plain", "bad-utf8", "nested", "not-an-object", "no-route", "method"],
)
def test_bad_bodies_and_paths_get_openai_errors(served, method, path, content, headers,
                                                status, says):
    r = httpx.request(method, f"{served}{path}", content=content, headers=headers, timeout=30)
    err = openai_error(r, status)
    assert says in err["message"], err


def test_nan_is_rejected(served):
    r = httpx.post(f"{served}/v1/completions", content='{"prompt": "hi", "temperature": NaN}',
                   headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 400 and "temperature" in r.text


def raw_request(base: str, head: str, parts: list[bytes], gap_s: float = 0.0,
                wait_s: float = 15) -> tuple[int, dict, float]:
    """Send a request by hand, as httpx would not (a chunked body past the cap, a body that
    stalls or trickles), `gap_s` between parts, and never finish it: (status, JSON body,
    seconds from the first byte to the answer). A server that waits for the rest times out."""
    host, port = base.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=wait_s)

    def send() -> None:
        with contextlib.suppress(OSError):  # the server answered and closed: stop sending
            sock.sendall(f"{head}\r\nHost: {host}\r\n\r\n".encode())
            for part in parts:
                sock.sendall(part)
                time.sleep(gap_s)

    start = time.perf_counter()
    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    data = b""
    with sock:
        while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"}"):
            chunk = sock.recv(65536)  # socket.timeout: no answer in wait_s
            if not chunk:
                break
            data += chunk
    elapsed = time.perf_counter() - start
    status = int(data.split(b" ", 2)[1])
    return status, json.loads(data[data.index(b"{"):data.rindex(b"}") + 1]), elapsed


def test_the_body_cap_holds_for_a_chunked_body(served):
    """No Content-Length to check: the bytes are counted as they come and the request is
    refused once they pass the cap (4096 here), while the client is still sending."""
    chunk = b"400\r\n" + b"x" * 1024 + b"\r\n"  # 1 KiB chunks, no terminating chunk
    status, body, _ = raw_request(
        served, "POST /v1/completions HTTP/1.1\r\nContent-Type: application/json\r\n"
        "Transfer-Encoding: chunked", [chunk] * 6)
    assert status == 413 and "4096" in body["error"]["message"], body


@pytest.mark.parametrize("chunked", [False, True], ids=["stalled", "trickled"])
def test_a_body_that_does_not_arrive_in_time_is_408(served, chunked):
    """body_timeout_s is 2 here: a body that stops half-way, or arrives a byte at a time, is
    answered then (it was held with no deadline)."""
    if chunked:
        head, parts = "Transfer-Encoding: chunked", [b"1\r\n{\r\n"] + [b"1\r\n \r\n"] * 40
    else:
        head, parts = "Content-Length: 100", [b'{"prompt": "h']
    status, body, elapsed = raw_request(
        served, f"POST /v1/completions HTTP/1.1\r\nContent-Type: application/json\r\n{head}",
        parts, gap_s=0.25)
    assert status == 408 and body["error"]["type"] == "timeout", body
    assert elapsed < 8, elapsed


def test_disconnect_mid_stream_frees_kv_blocks(served):
    body = {"model": "tiny", "prompt": "abc", "max_tokens": 400, "temperature": 0,
            "stream": True}
    with httpx.stream("POST", f"{served}/v1/completions", json=body, timeout=30) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                break  # leave after the first chunk
    deadline = time.time() + 20
    stats = {}
    while time.time() < deadline:
        stats = httpx.get(f"{served}/stats").json()
        if stats["running"] == 0 and stats["kv_blocks_used"] == 0:
            break
        time.sleep(0.2)
    assert stats["running"] == 0 and stats["kv_blocks_used"] == 0, stats
    assert stats["generation_tokens"] < 10_000


def test_a_replica_death_ends_its_streams_with_an_error_event_then_done(served, text_models):
    """The model-server replica dies mid-stream (killed): the stream ends with one error event
    saying so, then [DONE]; Serve starts a new replica and the app serves again."""
    import ray
    from ray import serve

    from dflash_ray.server.app import build_app

    target, drafter = text_models
    serve.run(build_app({"model_name": "tiny",
                         "engine": {"target": target, "drafter": drafter, "max_model_len": 512}}),
              name="mortal", route_prefix="/mortal", blocking=False)
    base = f"{served}/mortal"
    try:
        wait_healthy(base)
        name, namespace = next((a["name"], a["namespace"])
                               for a in ray.util.list_named_actors(all_namespaces=True)
                               if "mortal" in a["name"] and "DFlashServer" in a["name"])
        body = {"prompt": "a", "max_tokens": 480, "temperature": 0, "stream": True,
                "ignore_eos": True}
        lines = []
        with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=60) as r:
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                lines.append(line)
                if len(lines) == 2:
                    ray.kill(ray.get_actor(name, namespace=namespace), no_restart=False)
        assert lines[-1] == "data: [DONE]"
        error = json.loads(lines[-2][6:])["error"]
        assert error["type"] == "server_error" and "replica" in error["message"], error
        assert error["request_id"]
        deadline = time.time() + 90  # Serve replaces the dead replica
        while time.time() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                r = httpx.post(f"{base}/v1/completions", timeout=30,
                               json={"prompt": "a", "max_tokens": 2})
                if r.status_code == 200:
                    break
            time.sleep(1)
        assert r.status_code == 200, r.text
    finally:
        serve.delete("mortal")


def test_direct_streaming_serves_the_same_routes_from_the_model_replica(served, text_models):
    """`direct_streaming`: one deployment serves the routes itself. Same text, streamed and not,
    chat too; bad input still a 400 naming the field; a client that leaves frees its blocks."""
    import ray
    from ray import serve

    from dflash_ray.server.app import build_app

    target, drafter = text_models
    serve.run(build_app({"model_name": "tiny", "direct_streaming": True,
                         "engine": {"target": target, "drafter": drafter, "max_model_len": 512,
                                    **WHOLE}}),
              name="direct", route_prefix="/direct", blocking=False)
    base = f"{served}/direct"
    try:
        wait_healthy(base)
        deployments = {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                       if "direct" in a["name"]}
        assert any("DFlashDirect" in n for n in deployments)
        assert not any("Ingress" in n for n in deployments), deployments
        llm = LLM(*text_models, **WHOLE)
        want = llm.generate("hello world", SamplingParams(max_tokens=24), use_tqdm=False)[0]
        body = {"prompt": "hello world", "max_tokens": 24, "temperature": 0}
        got = httpx.post(f"{base}/v1/completions", json=body, timeout=30).json()
        assert got["choices"][0]["text"] == want.text
        assert got["usage"]["completion_tokens"] == 24
        text, usage = "", None
        with httpx.stream("POST", f"{base}/v1/completions", timeout=30,
                          json=body | {"stream": True,
                                       "stream_options": {"include_usage": True}}) as r:
            lines = [ln for ln in r.iter_lines() if ln.startswith("data: ")]
        assert lines[-1] == "data: [DONE]"
        for line in lines[:-1]:
            chunk = json.loads(line[6:])
            text += "".join(c["text"] for c in chunk["choices"])
            usage = chunk.get("usage") or usage
        assert text == want.text and usage["completion_tokens"] == 24
        prompt = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
        offline = llm.generate(prompt, SamplingParams(max_tokens=16), use_tqdm=False)[0]
        chat = httpx.post(f"{base}/v1/chat/completions", timeout=30, json={
            "messages": [{"role": "user", "content": "hi"}], "max_tokens": 16,
            "temperature": 0}).json()
        assert chat["choices"][0]["message"]["content"] == offline.text
        bad = httpx.post(f"{base}/v1/completions", json={"prompt": "a", "max_tokens": -1})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "max_tokens"
        with httpx.stream("POST", f"{base}/v1/completions", timeout=30,
                          json={"prompt": "abc", "max_tokens": 400, "stream": True}) as r:
            next(ln for ln in r.iter_lines() if ln.startswith("data: "))  # then leave
        deadline, stats = time.time() + 20, {}
        while time.time() < deadline:
            stats = httpx.get(f"{base}/stats").json()
            if stats["running"] == 0 and stats["kv_blocks_used"] == 0:
                break
            time.sleep(0.2)
        assert stats["running"] == 0 and stats["kv_blocks_used"] == 0, stats
    finally:
        serve.delete("direct")


@pytest.fixture(scope="module")
def tight(served, text_models):
    """A second app on the same Serve instance: one request in flight, a 0.3 s deadline, an
    API key, prompts of at most 64 characters and 4 messages."""
    from ray import serve

    from dflash_ray.server.app import build_app

    target, drafter = text_models
    app = build_app({"model_name": "tiny", "max_pending": 1,
                     "engine": {"target": target, "drafter": drafter, "max_model_len": 512,
                                **WHOLE},
                     "ingress": {"request_timeout_s": 0.3, "api_key": "sekret",
                                 "limits": {"max_prompt_chars": 64, "max_messages": 4}}})
    serve.run(app, name="tight", route_prefix="/tight", blocking=False)
    base = f"{served}/tight"
    wait_healthy(base)
    yield base
    serve.delete("tight")


def test_server_side_timeout_is_408(tight):
    r = httpx.post(f"{tight}/v1/completions", timeout=30, headers=AUTH,
                   json={"prompt": "a", "max_tokens": 480, "temperature": 0})
    assert r.status_code == 408 and r.json()["error"]["type"] == "timeout"


def test_stream_past_its_deadline_ends_with_a_timeout_event(tight):
    body = {"prompt": "a", "max_tokens": 480, "temperature": 0, "stream": True,
            "ignore_eos": True}
    with httpx.stream("POST", f"{tight}/v1/completions", json=body, headers=AUTH,
                      timeout=30) as r:
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    if r.status_code == 408:  # the 0.3 s deadline hit before the first token: no stream
        pytest.skip("the first token took longer than the deadline on this machine")
    events = [json.loads(line[6:]) for line in lines[:-1]]
    assert lines[-1] == "data: [DONE]" and events[-1]["error"]["type"] == "timeout"
    assert any(e.get("choices") for e in events[:-1])  # tokens streamed before it


def test_api_key_is_required_when_configured(tight):
    body = {"prompt": "a", "max_tokens": 2}
    assert httpx.post(f"{tight}/v1/completions", json=body).status_code == 401
    wrong = {"Authorization": "Bearer sekreT"}
    assert httpx.post(f"{tight}/v1/completions", json=body, headers=wrong).status_code == 401
    assert httpx.get(f"{tight}/health").status_code == 200  # probes need no key
    ok = httpx.post(f"{tight}/v1/completions", json=body, headers=AUTH, timeout=30)
    assert ok.status_code in (200, 408)  # authorised (the 0.3 s deadline may still hit)
    # everything that costs compute or shows state: /health/deep ran the model for anyone
    for path in ("/health/deep", "/stats", "/docs", "/redoc", "/openapi.json", "/v1/models"):
        err = openai_error(httpx.get(f"{tight}{path}", timeout=30), 401)
        assert err["type"] == "authentication_error", (path, err)
        assert httpx.get(f"{tight}{path}", headers=AUTH, timeout=60).status_code == 200, path


@pytest.mark.parametrize(
    "route,body,field,says",
    [
        ("completions", {"prompt": "p" * 65}, "prompt", "65 characters"),
        ("completions", {"prompt": ["p" * 65]}, "prompt", "at most 64"),
        ("chat/completions", {"messages": [{"role": "user", "content": "m"}] * 5}, "messages",
         "5 messages"),
        ("chat/completions", {"messages": [{"role": "user", "content": "m" * 40}] * 2},
         "messages", "80 characters"),
    ],
)
def test_prompt_and_messages_past_the_configured_limits_are_400(tight, route, body, field,
                                                                says):
    r = httpx.post(f"{tight}/v1/{route}", json=body, headers=AUTH, timeout=30)
    err = openai_error(r, 400)
    assert err["param"] == field and says in err["message"], err


def test_overload_is_503_with_retry_after(tight):
    async def one(client):
        body = {"prompt": "a", "max_tokens": 200, "temperature": 0, "stream": True}
        async with client.stream("POST", f"{tight}/v1/completions", json=body,
                                 headers=AUTH) as r:
            await r.aread()
            return r.status_code, r.headers.get("retry-after")

    async def main():
        async with httpx.AsyncClient(timeout=30) as client:
            return await asyncio.gather(*(one(client) for _ in range(6)))

    results = asyncio.run(main())
    refused = [h for code, h in results if code == 503]
    assert refused and all(h == "1" for h in refused), results


def test_health_and_deep_health(served):
    assert httpx.get(f"{served}/health").json() == {"status": "ok"}
    deep = httpx.get(f"{served}/health/deep", timeout=60).json()
    assert deep["status"] == "ok" and deep["drafted"] is True


class LocalBackend:
    """The ingress's Backend over a ModelServer in this process: what the Serve handle reaches
    in a replica, without Serve, so a test can hold the model server back or fail its engine."""

    def __init__(self):
        self.server = None

    def generate(self, prompt, messages, params, request_id):
        return self.server.generate(prompt, messages, params, request_id)

    async def call(self, method):
        while self.server is None:  # a Serve handle queues calls until a replica is up
            await asyncio.sleep(0.05)
        result = getattr(self.server, method)()
        return await result if asyncio.iscoroutine(result) else result


def model_server(text_models):
    from dflash_ray.server.model_server import ModelServer

    target, drafter = text_models
    return ModelServer({"target": target, "drafter": drafter, "max_model_len": 512, **WHOLE},
                       "tiny")


@pytest.fixture(scope="module")
def local():
    """make_api over a LocalBackend whose model server is not there yet, served by uvicorn."""
    import uvicorn

    from dflash_ray.server.ingress import IngressSettings, make_api

    backend = LocalBackend()
    api = make_api(lambda: backend, IngressSettings(model_name="tiny", request_timeout_s=30))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(api, host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    yield backend, f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)
    if backend.server is not None:
        backend.server.engine.shutdown()


def test_health_is_503_loading_until_the_model_server_is_ready(local, text_models, caplog):
    backend, base = local
    if backend.server is None:
        r = httpx.get(f"{base}/health", timeout=10)
        assert r.status_code == 503 and r.json()["status"] == "loading", r.text
        with caplog.at_level(logging.INFO, logger="dflash_ray.server.model_server"):
            backend.server = model_server(text_models)
        ready = [rec.getMessage() for rec in caplog.records if "ready" in rec.getMessage()]
        assert len(ready) == 1 and "'tiny'" in ready[0], ready  # one line, naming the model
    assert httpx.get(f"{base}/health", timeout=10).json() == {"status": "ok"}


def test_a_stream_failing_midway_ends_with_one_error_event_then_done(local, text_models,
                                                                     monkeypatch):
    backend, base = local
    if backend.server is None:
        backend.server = model_server(text_models)
    executor = backend.server.engine.executor
    execute, calls = executor.execute, []

    def failing(batch):  # the 4th step fails, as a lost worker would
        calls.append(batch)
        if len(calls) == 4:
            raise RuntimeError("injected: the target shard is gone\nTraceback (most recent...")
        return execute(batch)

    monkeypatch.setattr(executor, "execute", failing)
    body = {"prompt": "abc", "max_tokens": 200, "temperature": 0, "ignore_eos": True,
            "stream": True, "n": 2, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=30) as r:
        assert r.status_code == 200
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]", lines[-3:]
    events = [json.loads(line[6:]) for line in lines[:-1]]
    assert [e for e in events if "error" in e] == events[-1:]  # one, the last, no usage
    err = events[-1]["error"]
    assert err["type"] == "server_error" and err["code"] == 500 and err["request_id"], err
    assert "the target shard is gone" in err["message"] and "Traceback" not in err["message"]
    assert any(e.get("choices") for e in events[:-1])  # tokens streamed before it

    calls.clear()  # without streaming: a 500 in OpenAI's shape
    r = httpx.post(f"{base}/v1/completions", json=body | {"stream": False,
                                                          "stream_options": None}, timeout=30)
    assert openai_error(r, 500)["type"] == "server_error"


def test_an_ingress_bug_is_a_500_with_a_request_id(local, monkeypatch):
    backend, base = local

    def broken(*args):
        raise KeyError("a bug\nTraceback (most recent...")

    monkeypatch.setattr(backend, "generate", broken)
    r = httpx.post(f"{base}/v1/completions", json={"prompt": "hi"}, timeout=30,
                   headers={"x-request-id": "req-42"})
    err = openai_error(r, 500)
    assert err["request_id"] == "req-42" and "req-42" in err["message"], err


def test_an_ingress_bug_mid_stream_breaks_the_connection(local, text_models, monkeypatch):
    """Once a stream's 200 is out, a bug in the ingress cannot become an error response: the
    connection drops, so the client sees a broken stream, never one that looks complete."""
    backend, base = local
    if backend.server is None:
        backend.server = model_server(text_models)
    from dflash_ray.server import ingress

    def broken(*args):
        raise KeyError("a bug")

    monkeypatch.setattr(ingress, "usage", broken)  # runs after the last delta
    body = {"prompt": "abc", "max_tokens": 4, "stream": True,
            "stream_options": {"include_usage": True}}
    lines = []
    with pytest.raises(httpx.RemoteProtocolError), \
            httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=30) as r:
        assert r.status_code == 200
        lines.extend(r.iter_lines())
    assert any(line.startswith("data: {") for line in lines), lines  # deltas came first
    assert "data: [DONE]" not in lines


def test_deep_health_is_one_model_pass_for_many_callers(local, text_models):
    """60 calls (50 at once) share one check: it joined other users' batches per call."""
    backend, base = local
    if backend.server is None:
        backend.server = model_server(text_models)
    engine = backend.server.engine
    before = engine.stats().counters.prompt_tokens  # a check prefills one token

    async def burst():
        async with httpx.AsyncClient(timeout=60) as client:
            return await asyncio.gather(*(client.get(f"{base}/health/deep") for _ in range(50)))

    responses = asyncio.run(burst()) + [httpx.get(f"{base}/health/deep", timeout=60)
                                        for _ in range(10)]
    assert all(r.status_code == 200 and r.json()["status"] == "ok" for r in responses)
    assert engine.stats().counters.prompt_tokens - before <= 2  # one per 5 s ttl


def test_a_long_prompt_does_not_hold_up_other_requests(local, text_models):
    """A 1 MB prompt was tokenized on the event loop under the engine's lock: every other
    request waited for it. Short requests sent while it is tokenized now finish meanwhile."""
    backend, base = local
    if backend.server is None:
        backend.server = model_server(text_models)
    text = "ab" * 500_000
    start = time.perf_counter()
    backend.server.engine.tokenizer.encode(text)
    encode_s = time.perf_counter() - start
    if encode_s < 0.5:
        pytest.skip(f"tokenizing took only {encode_s:.2f}s here: nothing to wait for")
    big: list[httpx.Response] = []
    sender = threading.Thread(target=lambda: big.append(httpx.post(
        f"{base}/v1/completions", json={"prompt": text, "max_tokens": 1}, timeout=60)))
    sender.start()
    waits = []
    while sender.is_alive():
        start = time.perf_counter()
        r = httpx.post(f"{base}/v1/completions", timeout=60,
                       json={"prompt": "hi", "max_tokens": 8, "ignore_eos": True})
        assert r.status_code == 200, r.text
        waits.append(time.perf_counter() - start)
    sender.join()
    assert big[0].status_code == 400 and big[0].json()["error"]["param"] == "prompt"
    assert len(waits) >= 2 and max(waits) < encode_s / 2, (encode_s, waits)


def test_the_engine_refuses_a_lone_surrogate_naming_the_prompt(local, text_models):
    """Behind the edge's check, for the offline API too: the tokenizer raised a TypeError."""
    from dflash_ray.core.sampling_params import InvalidRequest

    backend, _ = local
    if backend.server is None:
        backend.server = model_server(text_models)
    with pytest.raises(InvalidRequest, match="surrogate") as info:
        backend.server.engine.add_request("a\ud800", SamplingParams(max_tokens=2))
    assert info.value.field == "prompt"


def test_generated_requests_never_get_a_server_error(served):
    """Schemathesis draws requests from the app's own OpenAPI schema; none may cause a 5xx."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings

    schema = schemathesis.openapi.from_dict(httpx.get(f"{served}/openapi.json").json())
    seen = []
    for path in ("/v1/completions", "/v1/chat/completions"):
        operation = schema[path]["POST"]

        @settings(max_examples=150, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy())
        def check(case):
            response = case.call(base_url=served, timeout=60)
            seen.append(response.status_code)
            assert response.status_code < 500, (case.body, response.text)

        check()
    assert len(seen) >= 200
    assert any(code == 200 for code in seen) and any(code == 400 for code in seen)
