#!/usr/bin/env python3
"""The OpenAI-compatible HTTP API against real processes, through the official `openai` SDK
(unmodified) and plain HTTP for what the SDK will not send. tests/e2e/openai_http.sh starts a
coordinator (with --http-address) and workers, and gives the addresses:

    openai_http.py --http URL --grpc HOST:PORT --metrics URL --mlaserve BIN --model NAME
                   [--no-worker-http URL]

Checks, each printing a line:
  - GET /v1/models lists the served model;
  - completions and chat completions, whole and streamed, greedy: the same text as the gRPC
    path (`mlaserve client --prompt` / `--chat`) gives; a stream's pieces add up to the whole
    answer; usage (and the include_usage chunk) counts the tokens; finish_reason;
  - stop strings (cut before the stop, never sent, finish_reason stop), seeded sampling
    repeats, logprobs (one per token, <= 0);
  - errors: OpenAI's error object with the right status for every malformed request (bad JSON,
    wrong types, unknown roles, empty messages, prompts over the context, invalid UTF-8, n != 1,
    unknown model and route, wrong method, oversized body), 401 without the API key where one is
    set, 503 without a worker, and the server keeps serving;
  - a client that disconnects mid-stream cancels its request (the coordinator's in-flight
    gauge returns to zero while the request had thousands of tokens to go), and admission
    beyond the coordinator's max_in_flight is a 429;
  - failover: the worker group streaming a chat is SIGKILLed mid-stream; the stream goes on
    (on the other group) with exactly the text of the unbroken answer.
"""
import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import openai

ARGS = None
FAILURES = []


def check(cond, what):
    print(("ok   " if cond else "FAIL ") + what, flush=True)
    if not cond:
        FAILURES.append(what)


def raw(method, path, body=None, headers=None, base=None):
    """(status, parsed JSON or text) of a plain HTTP request; body bytes are sent as they are."""
    url = (base or ARGS.http) + path
    data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            status, text = r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        status, text = e.code, e.read().decode()
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text


def grpc_text(*args):
    """What `mlaserve client` prints as text over gRPC (the last line is its summary)."""
    out = subprocess.run([ARGS.mlaserve, "--log-level", "warn", "client", "--address", ARGS.grpc,
                          "--temperature", "0", *args], check=True, capture_output=True,
                         text=True).stdout
    return out[:out.rindex("\n[")]


def metric(name):
    """The coordinator's value of a Prometheus metric (summed over its label sets)."""
    with urllib.request.urlopen(ARGS.metrics + "/metrics", timeout=10) as r:
        text = r.read().decode()
    values = re.findall(r"^" + name + r"(?:\{[^}]*\})? (\S+)$", text, re.M)
    return sum(float(v) for v in values) if values else None


def in_flight():
    return metric("mlaserve_requests_in_flight")


def main():
    global ARGS
    ap = argparse.ArgumentParser()
    for a in ("--http", "--grpc", "--metrics", "--mlaserve", "--model", "--no-worker-http"):
        ap.add_argument(a)
    ap.add_argument("--max-in-flight", type=int, default=6)
    ap.add_argument("--worker-pids", default="")  # by group: the failover check kills one
    ap.add_argument("--worker-port-base", type=int, default=0)
    ARGS = ap.parse_args()
    client = openai.OpenAI(base_url=ARGS.http + "/v1", api_key="unused", max_retries=0)
    model = ARGS.model

    # --- models ---
    models = client.models.list()
    check([m.id for m in models.data] == [model], f"/v1/models lists {model}")

    # --- completions: whole and streamed, greedy, equal to the gRPC path ---
    prompt = "The quick brown fox"
    expected = grpc_text("--prompt", prompt, "--max-tokens", "24", "--ignore-eos")
    c = client.completions.create(model=model, prompt=prompt, max_tokens=24, temperature=0,
                                  extra_body={"ignore_eos": True})
    check(c.choices[0].text == expected, "completion text equals the gRPC path's")
    check(c.usage.completion_tokens == 24 and c.choices[0].finish_reason == "length",
          f"completion usage {c.usage.completion_tokens} tokens, finish {c.choices[0].finish_reason}")
    pieces, usage = [], None
    for chunk in client.completions.create(model=model, prompt=prompt, max_tokens=24, temperature=0,
                                           stream=True, stream_options={"include_usage": True},
                                           extra_body={"ignore_eos": True}):
        if chunk.choices:
            pieces.append(chunk.choices[0].text)
        if chunk.usage:
            usage = chunk.usage
    check("".join(pieces) == expected, "streamed completion adds up to the whole one")
    check(usage is not None and usage.completion_tokens == 24 and
          usage.prompt_tokens == c.usage.prompt_tokens, "include_usage sends the usage last")

    # --- chat: whole and streamed, with and without a system message, multi-turn ---
    turns = ["Hello, who are you?", "A model.", "Tell me more."]
    messages = [{"role": "system", "content": "Be brief."}] + [
        {"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]
    expected = grpc_text("--system", "Be brief.", *sum((["--chat", t] for t in turns), []),
                         "--max-tokens", "20", "--ignore-eos")
    r = client.chat.completions.create(model=model, messages=messages, max_tokens=20, temperature=0,
                                       extra_body={"ignore_eos": True})
    check(r.choices[0].message.content == expected and r.choices[0].message.role == "assistant",
          "chat answer equals the gRPC path's (same template, same tokens)")
    stream = client.chat.completions.create(model=model, messages=messages, max_tokens=20,
                                            temperature=0, stream=True,
                                            extra_body={"ignore_eos": True})
    deltas, roles, finish = [], [], None
    for chunk in stream:
        d = chunk.choices[0].delta
        roles.append(d.role)
        deltas.append(d.content or "")
        finish = chunk.choices[0].finish_reason or finish
    check("".join(deltas) == expected and roles[0] == "assistant" and finish == "length",
          "streamed chat adds up to the whole answer (role first, finish last)")
    no_system = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=5, temperature=0)
    check(no_system.usage.prompt_tokens > 0 and no_system.usage.completion_tokens >= 1,
          "chat without a system message")
    parts = client.chat.completions.create(
        model=model, max_tokens=5, temperature=0,
        messages=[{"role": "user", "content": [{"type": "text", "text": "Hi"}]}])
    check(parts.choices[0].message.content == no_system.choices[0].message.content,
          "content as text parts equals content as a string")

    # --- stop strings, seeds, logprobs ---
    long = client.completions.create(model=model, prompt=prompt, max_tokens=40, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    stop = next((long[i:i + 2] for i in range(8, len(long) - 2)
                 if long[i:i + 2].strip() and long.find(long[i:i + 2]) == i), None)
    if stop is None:
        check(False, f"no usable stop string in {long!r}")
    else:
        cut = client.completions.create(model=model, prompt=prompt, max_tokens=40, temperature=0,
                                        stop=[stop], extra_body={"ignore_eos": True})
        check(cut.choices[0].text == long[:long.index(stop)] and
              cut.choices[0].finish_reason == "stop", f"stop {stop!r} cuts before it, never sent")
    seeded = [client.completions.create(model=model, prompt=prompt, max_tokens=16, temperature=0.9,
                                        seed=42, extra_body={"ignore_eos": True}).choices[0].text
              for _ in range(2)]
    check(seeded[0] == seeded[1], "the same seed gives the same sample")
    lp = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}],
                                        max_tokens=6, temperature=0, logprobs=True,
                                        extra_body={"ignore_eos": True})
    content = lp.choices[0].logprobs.content
    check(len(content) == 6 and all(t.logprob <= 0 for t in content),
          "chat logprobs: one per token, each <= 0")
    top = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}],
                                         max_tokens=6, temperature=0, logprobs=True,
                                         top_logprobs=3, extra_body={"ignore_eos": True})
    tc = top.choices[0].logprobs.content
    check(len(tc) == 6 and all(len(t.top_logprobs) == 3 and t.top_logprobs[0].token == t.token and
                               abs(t.top_logprobs[0].logprob - t.logprob) < 1e-6 and
                               t.top_logprobs[0].logprob >= t.top_logprobs[2].logprob for t in tc),
          "chat top_logprobs 3: greedy's token is the most likely, in order")
    cl = client.completions.create(model=model, prompt=prompt, max_tokens=5, temperature=0,
                                   logprobs=2, extra_body={"ignore_eos": True}).choices[0].logprobs
    check(len(cl.tokens) == 5 and len(cl.top_logprobs) == 5 and
          all(len(t) >= 1 for t in cl.top_logprobs) and "".join(cl.tokens) != "",
          "completion logprobs 2: tokens, token_logprobs and top_logprobs per token")

    # --- errors: each a 400 (or its status) naming the field; the server goes on serving ---
    def refused(status, body, field, what, path="/v1/chat/completions", base=None, headers=None):
        got, answer = raw("POST", path, body, headers=headers, base=base)
        err = answer.get("error", {}) if isinstance(answer, dict) else {}
        ok = got == status and field in err.get("message", "") and "type" in err
        check(ok, f"{what}: {got} {err.get('message', answer)!r}")

    chat = {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
    refused(400, b'{"model": "x", "messages": [', "malformed JSON", "malformed JSON")
    refused(400, b'[1, 2]', "JSON object", "a body that is not an object")
    refused(400, {**chat, "max_tokens": "ten"}, "max_tokens", "max_tokens of the wrong type")
    refused(400, {**chat, "temperature": 3}, "temperature", "temperature out of range")
    refused(400, {**chat, "n": 2}, "n", "n = 2")
    refused(400, {**chat, "stream": "yes"}, "stream", "stream of the wrong type")
    refused(400, {**chat, "stop": 5}, "stop", "stop of the wrong type")
    refused(400, {**chat, "messages": []}, "messages", "empty messages")
    refused(400, {**chat, "messages": "Hi"}, "messages", "messages not a list")
    refused(400, {**chat, "messages": [{"role": "robot", "content": "x"}]}, "messages[0].role",
            "an unknown role")
    refused(400, {**chat, "messages": [{"role": "user"}]}, "messages[0].content", "no content")
    refused(400, {"model": model, "max_tokens": 4}, "messages", "no messages")
    refused(400, {**chat, "messages": [{"role": "user", "content": "word " * 3000}]}, "messages",
            "a prompt over the context")
    refused(400, {"model": model, "prompt": "hi " * 3000}, "prompt", "a completion prompt over the context",
            path="/v1/completions")
    refused(400, b'{"model": "' + model.encode() + b'", "messages": [{"role": "user", "content": "a\xff\xfeb"}]}',
            "messages[0].content", "invalid UTF-8")
    refused(404, {**chat, "model": "gpt-4"}, "gpt-4", "an unknown model")
    refused(404, chat, "no route", "an unknown route", path="/v1/embeddings")
    got, _ = raw("GET", "/v1/chat/completions")
    check(got == 405, f"GET on a POST route: {got}")
    refused(413, b"{" + b" " * 100000 + b"}", "limit", "a body over the limit")
    try:
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": "x"}],
                                       max_tokens=2, temperature=-1)
        check(False, "the SDK's BadRequestError for temperature -1")
    except openai.BadRequestError as e:
        check(e.status_code == 400 and "temperature" in str(e), "the SDK sees a BadRequestError")
    if ARGS.no_worker_http:
        refused(401, chat, "API key", "no API key where one is set: 401", base=ARGS.no_worker_http)
        refused(401, chat, "API key", "a wrong API key: 401", base=ARGS.no_worker_http,
                headers={"Authorization": "Bearer wrong"})
        refused(503, chat, "no worker is alive", "no worker alive: 503", base=ARGS.no_worker_http,
                headers={"Authorization": "Bearer idle-key"})
    again = client.chat.completions.create(model=model, messages=messages, max_tokens=20,
                                           temperature=0, extra_body={"ignore_eos": True})
    check(again.choices[0].message.content == expected, "still serving after the refusals")

    # --- a client that disconnects cancels its request; admission answers 429 ---
    def open_stream():
        req = urllib.request.Request(
            ARGS.http + "/v1/chat/completions", method="POST",
            data=json.dumps({**chat, "max_tokens": 1500, "stream": True,
                             "ignore_eos": True}).encode(),
            headers={"Content-Type": "application/json"})
        resp = urllib.request.urlopen(req, timeout=60)
        return resp, resp.readline()

    def settle(value):
        deadline = time.time() + 10
        while time.time() < deadline and in_flight() != value:
            time.sleep(0.1)
        return in_flight()

    before = in_flight()
    resp, first = open_stream()
    busy = in_flight()
    resp.close()
    after = settle(before)
    check(first.startswith(b"data: ") and busy == before + 1 and after == before,
          f"a client that disconnects cancels its request (in flight {before} -> {busy} -> {after})")
    streams = [open_stream()[0] for _ in range(ARGS.max_in_flight)]
    refused(429, chat, "in flight", f"admission beyond {ARGS.max_in_flight} in flight: 429")
    for r in streams:
        r.close()
    check(settle(before) == before, "closing the streams frees their admission slots")
    again = client.chat.completions.create(model=model, messages=messages, max_tokens=20,
                                           temperature=0, extra_body={"ignore_eos": True})
    check(again.choices[0].message.content == expected, "serving again after the 429s")

    # --- failover: a worker group dies under streams; they go on, nothing lost or repeated ---
    if ARGS.worker_pids:
        import threading
        pids = [int(p) for p in ARGS.worker_pids.split(",")]
        chats = [dict(model=model, messages=[{"role": "user", "content": f"Count to {i}."}],
                      max_tokens=1800, temperature=0, extra_body={"ignore_eos": True})
                 for i in range(4)]  # fewer than the coordinator's max_in_flight
        unbroken = [client.chat.completions.create(**c).choices[0].message.content for c in chats]
        failovers = metric("mlaserve_failovers_total") or 0
        texts = [[] for _ in chats]
        started = threading.Barrier(len(chats) + 1)

        def stream(i):
            first = True
            try:
                for chunk in client.chat.completions.create(**chats[i], stream=True):
                    texts[i].append(chunk.choices[0].delta.content or "")
                    if first:
                        first = False
                        started.wait(timeout=60)
            except Exception as e:  # noqa: BLE001 (any failure is this check's)
                texts[i].append(f"<{e}>")
                if first:
                    started.abort()

        threads = [threading.Thread(target=stream, args=(i,)) for i in range(len(chats))]
        for t in threads:
            t.start()
        try:
            started.wait(timeout=60)
        except threading.BrokenBarrierError:
            pass
        status = subprocess.run([ARGS.mlaserve, "--log-level", "warn", "client", "--address",
                                 ARGS.grpc, "--status"], check=True, capture_output=True,
                                text=True).stdout
        busiest, killed = 0, None
        for row in status.splitlines():
            cols = row.split()  # ... IN FLIGHT, then the heartbeat's age ("12 ms")
            if len(cols) > 9 and cols[2] == "alive" and cols[-3].isdigit() and int(cols[-3]) > busiest:
                busiest, killed = int(cols[-3]), int(cols[0].rsplit(":", 1)[1]) - ARGS.worker_port_base
        if killed is not None:
            os.kill(pids[killed], signal.SIGKILL)
        for t in threads:
            t.join()
        same = sum("".join(texts[i]) == unbroken[i] for i in range(len(chats)))
        moved = (metric("mlaserve_failovers_total") or 0) - failovers
        check(killed is not None and same == len(chats) and moved >= 1,
              f"worker group {killed} killed under {busiest} of {len(chats)} streams: {moved:.0f} "
              f"failed over, {same} went on with exactly the unbroken text")

    print(f"{len(FAILURES)} failed" if FAILURES else "all passed")
    return 1 if FAILURES else 0


if __name__ == "__main__":
    sys.exit(main())
