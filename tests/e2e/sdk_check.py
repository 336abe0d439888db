#!/usr/bin/env python3
"""Drive the official `anthropic` Python SDK against keyhole (or the fake).

Environment:
  ANTHROPIC_BASE_URL   where the SDK sends requests (keyhole's http:// URL)
  ANTHROPIC_API_KEY    the placeholder key the sandbox would hold
  FAKE_LOG             the fake upstream's JSON-lines request log
  FAKE_DELAY           seconds the fake sleeps between stream deltas
  EXPECT_HOST          (optional) the Host header the fake must see
  E2E_CA_FILE          (optional) CA bundle for talking TLS to the fake directly
  E2E_DIRECT=1         (optional) talking to the fake directly: skip the
                       checks that only make sense through keyhole

Prints one `PASS name` / `FAIL name: why` line per check; exit 1 if any failed.
"""

import asyncio
import json
import os
import sys
import time

import anthropic
import httpx

EXPECTED_STREAM = "Hello from the fake Anthropic stream!"
N_DELTAS = 7
MODEL = "claude-sonnet-4-5"

BASE = os.environ["ANTHROPIC_BASE_URL"]
PLACEHOLDER = os.environ["ANTHROPIC_API_KEY"]
LOG = os.environ["FAKE_LOG"]
DELAY = float(os.environ.get("FAKE_DELAY", "0.3"))
EXPECT_HOST = os.environ.get("EXPECT_HOST")
CA = os.environ.get("E2E_CA_FILE")
DIRECT = os.environ.get("E2E_DIRECT") == "1"

failed = 0


def result(name, ok, why=""):
    global failed
    if ok:
        print("PASS sdk: %s" % name, flush=True)
    else:
        failed += 1
        print("FAIL sdk: %s: %s" % (name, why), flush=True)


def check(name, fn):
    try:
        why = fn()
    except Exception as e:  # noqa: BLE001 - report anything as a failure
        why = "%s: %s" % (type(e).__name__, e)
    result(name, not why, why or "")


def records():
    with open(LOG, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def record_for(msg_id):
    found = [r for r in records() if r.get("msg_id") == msg_id]
    if len(found) != 1:
        raise AssertionError("expected 1 fake record for %s, found %d" % (msg_id, len(found)))
    return found[0]


def key_problems(rec, allow_other_auth=False):
    problems = []
    if not rec["saw_real_key"]:
        problems.append("fake did not see exactly one x-api-key with the real key "
                        "(count=%d)" % rec["x_api_key_count"])
    if rec["placeholder_seen"]:
        problems.append("placeholder key reached the fake")
    if rec["other_auth_headers"] and not allow_other_auth:
        problems.append("other auth headers reached the fake: %s" % rec["other_auth_headers"])
    if EXPECT_HOST and rec["host"] != EXPECT_HOST:
        problems.append("fake saw Host %r, expected %r" % (rec["host"], EXPECT_HOST))
    return "; ".join(problems)


def http_client(async_=False):
    kw = {"verify": CA} if CA else {}
    return (anthropic.DefaultAsyncHttpxClient if async_ else anthropic.DefaultHttpxClient)(**kw)


client = anthropic.Anthropic(base_url=BASE, api_key=PLACEHOLDER, max_retries=0,
                             timeout=30, http_client=http_client())

state = {}


def create():
    msg = client.messages.create(model=MODEL, max_tokens=64,
                                 messages=[{"role": "user", "content": "ping one two"}])
    state["create"] = msg
    if msg.content[0].text != "pong: ping one two":
        return "unexpected text %r" % msg.content[0].text
    if msg.stop_reason != "end_turn" or msg.model != MODEL or not msg.id.startswith("msg_fake_"):
        return "unexpected message %r" % msg
    if msg.usage.input_tokens != 3:
        return "unexpected usage %r" % msg.usage
    if not (msg._request_id or "").startswith("req_fake_"):
        return "response header request-id did not come through: %r" % msg._request_id
    return ""


def create_key():
    return key_problems(record_for(state["create"].id))


def stream():
    arrivals = []
    pieces = []
    t0 = time.time()
    with client.messages.stream(model=MODEL, max_tokens=64,
                                messages=[{"role": "user", "content": "stream please"}]) as s:
        for text in s.text_stream:
            arrivals.append(time.time())
            pieces.append(text)
        final = s.get_final_message()
    state["stream"] = (final, arrivals, t0)
    text = "".join(pieces)
    if text != EXPECTED_STREAM:
        return "text_stream gave %r, expected %r" % (text, EXPECTED_STREAM)
    if len(pieces) != N_DELTAS:
        return "got %d text deltas, expected %d" % (len(pieces), N_DELTAS)
    if final.content[0].text != EXPECTED_STREAM:
        return "final message text %r" % final.content[0].text
    if final.stop_reason != "end_turn" or final.usage.output_tokens != N_DELTAS:
        return "final message %r" % final
    return ""


def stream_incremental():
    final, arrivals, _ = state["stream"]
    rec = record_for(final.id)
    last_sent = rec["delta_sent_times"][-1]
    if arrivals[0] >= last_sent:
        return ("first delta arrived %.3fs AFTER the fake sent the last one: stream was buffered"
                % (arrivals[0] - last_sent))
    spread = arrivals[-1] - arrivals[0]
    want = 0.5 * (N_DELTAS - 1) * DELAY
    if spread < want:
        return "deltas arrived within %.3fs, expected at least %.3fs apart" % (spread, want)
    return ""


def stream_key():
    return key_problems(record_for(state["stream"][0].id))


def bearer_stripped():
    # The sandbox SDK configured with an auth token sends
    # `Authorization: Bearer <placeholder>`; keyhole must strip it and inject x-api-key.
    c = anthropic.Anthropic(base_url=BASE, api_key=None, auth_token=PLACEHOLDER, max_retries=0,
                            timeout=30, http_client=http_client())
    msg = c.messages.create(model=MODEL, max_tokens=16,
                            messages=[{"role": "user", "content": "bearer"}])
    if msg.content[0].text != "pong: bearer":
        return "unexpected text %r" % msg.content[0].text
    return key_problems(record_for(msg.id))


def async_stream():
    async def run():
        ac = anthropic.AsyncAnthropic(base_url=BASE, api_key=PLACEHOLDER, max_retries=0,
                                      timeout=30, http_client=http_client(async_=True))
        pieces = []
        async with ac.messages.stream(model=MODEL, max_tokens=64,
                                      messages=[{"role": "user", "content": "async"}]) as s:
            async for text in s.text_stream:
                pieces.append(text)
            final = await s.get_final_message()
        await ac.close()
        return "".join(pieces), final
    text, final = asyncio.run(run())
    if text != EXPECTED_STREAM or final.content[0].text != EXPECTED_STREAM:
        return "async text_stream gave %r" % text
    return key_problems(record_for(final.id))


def many_on_one_client():
    # Several sequential requests on the same keep-alive client connection pool.
    for i in range(5):
        msg = client.messages.create(model=MODEL, max_tokens=8,
                                     messages=[{"role": "user", "content": "n%d" % i}])
        if msg.content[0].text != "pong: n%d" % i:
            return "request %d: unexpected text %r" % (i, msg.content[0].text)
        p = key_problems(record_for(msg.id))
        if p:
            return "request %d: %s" % (i, p)
    return ""


def concurrent_streams():
    # 8 streams at once on one async client: they must run side by side, each intact.
    n = 8

    async def one(ac, i):
        async with ac.messages.stream(model=MODEL, max_tokens=64,
                                      messages=[{"role": "user", "content": "c%d" % i}]) as s:
            text = "".join([t async for t in s.text_stream])
            final = await s.get_final_message()
        return text, final

    async def run():
        ac = anthropic.AsyncAnthropic(base_url=BASE, api_key=PLACEHOLDER, max_retries=0,
                                      timeout=30, http_client=http_client(async_=True))
        t0 = time.time()
        res = await asyncio.gather(*(one(ac, i) for i in range(n)))
        await ac.close()
        return res, time.time() - t0

    res, took = asyncio.run(run())
    for text, final in res:
        if text != EXPECTED_STREAM:
            return "a stream gave %r" % text
        p = key_problems(record_for(final.id))
        if p:
            return p
    if len({final.id for _, final in res}) != n:
        return "streams got mixed up: ids %s" % [f.id for _, f in res]
    one_stream = (N_DELTAS - 1) * DELAY
    if took > 3 * one_stream + 2:
        return "%d streams took %.2fs: not concurrent (one takes %.2fs)" % (n, took, one_stream)
    return ""


def stream_abandoned():
    # The client drops a stream after the first delta; the next requests must get
    # their own, correct responses (no leftover stream bytes from a reused connection).
    with client.messages.stream(model=MODEL, max_tokens=64,
                                messages=[{"role": "user", "content": "abandon"}]) as s:
        for _ in s.text_stream:
            break
    for i in range(3):
        msg = client.messages.create(model=MODEL, max_tokens=8,
                                     messages=[{"role": "user", "content": "after %d" % i}])
        if msg.content[0].text != "pong: after %d" % i:
            return "request %d after the abandoned stream: unexpected text %r" % (
                i, msg.content[0].text)
    return ""


def wrong_key_direct():
    # Only meaningful talking to the fake directly: proves the fake enforces the key,
    # and the SDK surfaces the Anthropic-style 401.
    c = anthropic.Anthropic(base_url=BASE, api_key=os.environ["E2E_WRONG_KEY"], max_retries=0,
                            timeout=30, http_client=http_client())
    try:
        c.messages.create(model=MODEL, max_tokens=8, messages=[{"role": "user", "content": "x"}])
    except anthropic.AuthenticationError as e:
        if e.status_code == 401 and "invalid x-api-key" in str(e):
            return ""
        return "unexpected AuthenticationError %r" % e
    return "fake accepted the placeholder key"


print("# anthropic %s, httpx %s, base_url %s" % (anthropic.__version__, httpx.__version__, BASE),
      flush=True)
check("messages.create returns the fake's message", create)
if "create" in state:
    check("messages.create: fake saw the real key, never the placeholder", create_key)
check("messages.stream text_stream and get_final_message", stream)
if "stream" in state:
    check("messages.stream arrives incrementally (first delta before last was sent)",
          stream_incremental)
    check("messages.stream: fake saw the real key, never the placeholder", stream_key)
check("5 sequential requests on one keep-alive client", many_on_one_client)
check("AsyncAnthropic messages.stream", async_stream)
check("8 concurrent AsyncAnthropic streams", concurrent_streams)
check("stream abandoned after one delta, then 3 more requests", stream_abandoned)
if DIRECT:
    if os.environ.get("E2E_WRONG_KEY"):
        check("fake rejects a wrong key with an Anthropic-style 401", wrong_key_direct)
else:
    check("Authorization: Bearer placeholder is stripped, real key injected", bearer_stripped)

sys.exit(1 if failed else 0)
