"""The model lifecycle without HTTP: one load per model, keep-alive with an injected
clock, the memory budget, in-flight requests in the status, and the text stream."""

from __future__ import annotations

import asyncio
import json
import threading

import pytest
import torch

from sllm.core.engine import EngineConfig, SamplingParams
from sllm.core.format import open_checkpoint
from sllm.errors import CacheError
from sllm.server.models import ModelLoadFailed, ModelManager, ModelNotFound, ServeConfig
from sllm.server.text import TextStream, chat_ids, chat_prompt, encode


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def _manager(models_dir, clock=None, **config) -> ModelManager:
    return ModelManager(ServeConfig(models_dir=models_dir, **config), **({"clock": clock} if clock else {}))


def test_concurrent_acquires_share_one_load(models_dir):
    async def scenario():
        m = _manager(models_dir)
        leases = await asyncio.gather(*(m.acquire("gpt2-a") for _ in range(8)))
        assert m.counters["loads"] == 1
        assert len({id(lease.resident) for lease in leases}) == 1 and leases[0].resident.leases == 8
        assert sum(lease.cold is not None for lease in leases) == 1  # the one that started the load
        for lease in leases:
            m.release(lease)
            m.release(lease)  # idempotent
        assert leases[0].resident.leases == 0
        with pytest.raises(ModelNotFound, match="gpt2-a, gpt2-b"):
            await m.acquire("nope")
        await m.close()

    asyncio.run(scenario())


def test_a_node_without_a_budget_reserves_one_model_at_start_and_its_first_load_reads_into_it(models_dir, monkeypatch):
    from sllm.core.partitions import PAGE_CACHE_ENV
    from sllm.io.hostmem import round_up

    # a cold read, not a mapping of the file's cached pages (which other tests' loads may keep mapped)
    monkeypatch.setenv(PAGE_CACHE_ENV, "0")

    nbytes = round_up(open_checkpoint(models_dir / "gpt2-a").manifest.partitions[0].nbytes)  # both models' size

    async def scenario():
        m = _manager(models_dir)
        m.start()
        await asyncio.wrap_future(m.reservation)
        st = await m.status()
        assert st["pool_ready"] and st["pool_free_bytes"] == nbytes  # one model's buffers, not both
        lease = await m.acquire("gpt2-a")
        stats = m.pool.stats()
        assert stats.allocations == 1 and stats.reuses == 1 and stats.free_bytes == 0  # the reserved buffer
        m.release(lease)
        await m.close()

    asyncio.run(scenario())


def test_a_cache_node_reserves_its_ssd_entries_within_the_dram_tier_or_its_largest_without_one(models_dir, tmp_path):
    from sllm.core.cache import CacheConfig, TierCache
    from sllm.core.pool import HostMemoryPool
    from sllm.io.hostmem import round_up

    one = round_up(open_checkpoint(models_dir / "gpt2-a").manifest.partitions[0].nbytes)
    cache = TierCache(CacheConfig(tmp_path / "c", remote_url=str(models_dir)), pool=HostMemoryPool())
    for m in ("gpt2-a", "gpt2-b"):
        cache.pull(m)  # into the SSD tier
    cache.close()

    async def reserved(dram_capacity: int) -> int:
        m = ModelManager(ServeConfig(cache=CacheConfig(tmp_path / "c", dram_capacity_bytes=dram_capacity)))
        m.start()
        await asyncio.wrap_future(m.reservation)
        free = m.pool.stats().free_bytes
        await m.close()
        return free

    async def scenario():
        assert await reserved(0) == one  # no DRAM tier, no --max-memory: the largest model
        assert await reserved(2 * one + one // 2) == 2 * one  # the SSD entries that fit the DRAM tier

    asyncio.run(scenario())


def test_an_unloads_collection_waits_until_no_cold_start_is_under_way():
    from sllm.server.warmup import COLLECT_DEFER_SECONDS, UnloadCollection

    clock, submitted = FakeClock(), []
    g = UnloadCollection(lambda fn, **kw: submitted.append(kw), clock)
    assert not g.poll(busy=False) and submitted == []  # nothing unloaded
    g.unloaded()
    clock.t += 1
    g.unloaded()  # a second unload joins the first's collection
    assert not g.poll(busy=True) and submitted == []
    assert g.poll(busy=False) and submitted == [{"thaw": True}] and not g.poll(busy=False)
    g.unloaded()
    clock.t += COLLECT_DEFER_SECONDS
    assert g.poll(busy=True) and len(submitted) == 2  # busy for too long: collected anyway


def test_a_load_that_unloads_to_make_room_collects_after_its_first_token(models_dir):
    size = open_checkpoint(models_dir / "gpt2-a").manifest.total_bytes

    async def scenario():
        m = _manager(models_dir, max_memory_bytes=size + (2 << 20) + (size // 2),
                     engine=EngineConfig(kv_cache_bytes=1 << 20))  # room for one model and its KV cache
        polls = []
        m.garbage._submit = lambda fn, **kw: polls.append(kw)
        m.release(await m.acquire("gpt2-a"))
        assert polls == [] and not m.cold_starting()
        m.first_token(lease := await m.acquire("gpt2-b"))  # gpt2-a unloaded for room during the load
        m.release(lease)
        assert m.counters["unloads"] == 1 and polls == [{"thaw": True}]
        await m.close()

    asyncio.run(scenario())


def test_keep_alive_unloads_idle_models_only(models_dir):
    async def scenario():
        clock = FakeClock()
        m = _manager(models_dir, clock, keep_alive_seconds=10)
        lease = await m.acquire("gpt2-a")
        clock.t += 100
        assert await m.reap() == []  # leased: never unloaded
        m.release(lease)
        clock.t += 9.5
        assert await m.reap() == []
        clock.t += 0.5
        assert await m.reap() == ["gpt2-a"]
        st = await m.status()
        assert st["resident"] == [] and st["counters"]["unloads"] == 1 and st["resident_bytes"] == 0
        lease = await m.acquire("gpt2-a")  # loads again
        assert m.counters["loads"] == 2 and lease.load_seconds >= 0
        m.release(lease)
        await m.close()

    asyncio.run(scenario())


def test_memory_budget_evicts_the_least_recently_used_idle_model(models_dir):
    size = {mid: open_checkpoint(models_dir / mid).manifest.total_bytes for mid in ("gpt2-a", "gpt2-b")}
    kv = 1 << 20  # each model's KV cache counts in the budget beside its weights

    async def scenario():
        clock = FakeClock()
        m = _manager(models_dir, clock, max_memory_bytes=max(size.values()) + kv + 1,
                     engine=EngineConfig(kv_cache_bytes=kv))
        a = await m.acquire("gpt2-a")
        st = await m.status()
        assert st["resident_bytes"] == size["gpt2-a"] + kv and st["resident"][0]["kv"]["total_bytes"] == kv
        m.release(a)
        clock.t += 1
        b = await m.acquire("gpt2-b")
        st = await m.status()
        assert [r["model"] for r in st["resident"]] == ["gpt2-b"] and st["counters"]["unloads"] == 1
        assert st["resident_bytes"] <= st["max_memory_bytes"]
        # gpt2-b is leased: a load of gpt2-a waits for it to go idle, then evicts it
        pending = asyncio.ensure_future(m.acquire("gpt2-a"))
        await asyncio.sleep(0.3)
        assert not pending.done() and (await m.status())["resident"][0]["model"] == "gpt2-b"
        m.release(b)
        a = await asyncio.wait_for(pending, 60)
        assert [r["model"] for r in (await m.status())["resident"]] == ["gpt2-a"]
        m.release(a)
        await m.close()

        small = _manager(models_dir, max_memory_bytes=size["gpt2-a"] - 1)
        with pytest.raises(ModelLoadFailed, match="--max-memory") as info:
            await small.acquire("gpt2-a")
        assert isinstance(info.value.__cause__, CacheError)
        await small.close()

    asyncio.run(scenario())


def test_status_lists_in_flight_requests_with_their_tokens(models_dir):
    async def scenario():
        m = _manager(models_dir)
        lease = await m.acquire("gpt2-b")
        gate, got_one = threading.Event(), threading.Event()

        def listener(gen, token):  # holds the engine thread after the first token
            if token is not None:
                got_one.set()
                gate.wait(30)

        gen = lease.resident.engine.submit([1, 2, 3], SamplingParams(max_tokens=4), request_id="r1", listener=listener)
        assert await asyncio.to_thread(got_one.wait, 30)
        [res] = (await m.status())["resident"]
        assert res["requests"] == [{"id": "r1", "prompt_tokens": 3, "completion_tokens": 1}]
        assert res["idle_seconds"] == 0.0  # leased
        gate.set()
        assert await asyncio.to_thread(gen.wait, 30)
        assert (await m.status())["resident"][0]["requests"] == [] and len(gen.generated) == 4
        m.release(lease)
        await m.close()

    asyncio.run(scenario())


def test_text_stream_holds_back_partial_stops_and_utf8(tokenizer_gpt2):
    tok = tokenizer_gpt2
    s = TextStream(tok, ["the end", "xyz"])
    seen, out = [], ""
    for t in tok.encode("Hello world, this is the end. More text"):
        out += s.push(t)
        seen.append(out)
        if s.stopped:
            break
    # " the" could start "the end": held back, never half-sent; then the stop cuts before it
    assert seen == ["Hello", "Hello world", "Hello world,", "Hello world, this", "Hello world, this is",
                    "Hello world, this is ", "Hello world, this is "]  # fmt: skip
    assert s.stopped and s.flush() == ""
    # a character split across byte tokens is held back until whole
    euro = tok.encode("𝄞")  # musical G clef: 4 UTF-8 bytes
    assert len(euro) > 1
    s = TextStream(tok)
    parts = [s.push(t) for t in euro]
    assert parts[:-1] == [""] * (len(euro) - 1) and parts[-1] == "𝄞" and s.flush() == ""
    s = TextStream(tok)
    assert s.push(euro[0]) == "" and s.flush() == "\ufffd"  # an incomplete tail is flushed at the end
    assert chat_prompt(tok, [("user", "Hi")]) == "user: Hi\nassistant:"
    assert encode(tok, "") == [tok.bos_token_id]


def test_text_stream_equals_a_whole_decode(tokenizer_gpt2):
    """Windowed incremental decoding gives exactly the text of decoding all ids at once,
    for random ids (byte tokens split characters often) and for multi-byte text."""
    tok = tokenizer_gpt2
    g = torch.Generator().manual_seed(0)
    cases = [torch.randint(0, tok.vocab_size, (60,), generator=g).tolist() for _ in range(20)]
    cases.append(tok.encode("naïve café — 日本語 𝄞, emoji 🎉 and more"))
    for ids in cases:
        s = TextStream(tok)
        out = "".join(s.push(t) for t in ids) + s.flush()
        assert out == tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


@pytest.fixture(scope="module")
def tokenizer_gpt2():
    from transformers import AutoTokenizer

    from sllm.zoo import GPT2_DIR

    return AutoTokenizer.from_pretrained(GPT2_DIR)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_node_loads_to_the_gpu_and_generates(models_dir):
    async def scenario():
        m = _manager(models_dir, device="cuda")
        lease = await m.acquire("gpt2-a")
        res = lease.resident
        assert next(res.model.parameters()).device.type == "cuda"
        gen = res.engine.submit([1, 2, 3], SamplingParams(max_tokens=6))
        assert await asyncio.to_thread(gen.wait, 60) and len(gen.generated) == 6
        m.release(lease)
        await m.close()

    asyncio.run(scenario())


def test_chat_template_is_used_when_the_tokenizer_has_one(tokenizer_gpt2):
    import copy

    tok = copy.deepcopy(tokenizer_gpt2)
    tok.chat_template = "{% for m in messages %}<|endoftext|>[{{ m.role }}] {{ m.content }}\n{% endfor %}[assistant]"
    msgs = [("user", "Hi")]
    assert chat_prompt(tok, msgs) == "<|endoftext|>[user] Hi\n[assistant]"
    ids = chat_ids(tok, msgs)
    assert ids[0] == tok.eos_token_id and ids.count(tok.eos_token_id) == 1  # the template's, not doubled


def test_freeze_heap_takes_objects_out_of_collections_and_an_unload_thaws_them():
    """In a subprocess (the suite keeps its own collector): nothing happens until enabled;
    then objects are frozen, and cyclic garbage frozen by a load is collected at the unload."""
    import subprocess
    import sys

    code = """
import gc, weakref
from sllm.server.warmup import enable_heap_freezing, freeze_heap
before = gc.get_freeze_count()
freeze_heap()
assert gc.get_freeze_count() == before == 0, "acted before it was enabled"
enable_heap_freezing()
class Cycle: pass
c = Cycle(); c.me = c; ref = weakref.ref(c)
freeze_heap(collect=False)  # after a load
assert gc.get_freeze_count() > 0
del c
gc.collect()
assert ref() is not None, "a frozen cycle was collected"
freeze_heap(thaw=True)  # after an unload
assert ref() is None and gc.get_freeze_count() > 0
print("ok")
"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and p.stdout.strip() == "ok", p.stderr


def test_a_reload_reuses_the_tokenizer_unless_its_files_changed(models_dir, tmp_path):
    """Scale to zero keeps the tokenizer: the reload gets the same object (no second parse);
    a model whose tokenizer files changed between loads gets a freshly loaded one."""
    import shutil

    local = tmp_path / "models"
    shutil.copytree(models_dir / "gpt2-a", local / "gpt2-a")

    async def scenario():
        clock = FakeClock()
        m = _manager(local, clock, keep_alive_seconds=10)
        lease = await m.acquire("gpt2-a")
        first = lease.resident.tokenizer
        m.release(lease)
        clock.t += 10
        assert await m.reap() == ["gpt2-a"]
        assert (await m.status())["tokenizers"] == ["gpt2-a"]  # the scheduler counts no parse here
        lease = await m.acquire("gpt2-a")
        assert lease.resident.tokenizer is first and (m.tokenizers.hits, m.tokenizers.misses) == (1, 1)
        m.release(lease)
        clock.t += 10
        assert await m.reap() == ["gpt2-a"]
        assert first.pad_token is None
        cfg = local / "gpt2-a" / "tokenizer_config.json"
        cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "pad_token": "<|endoftext|>"}))
        lease = await m.acquire("gpt2-a")
        assert lease.resident.tokenizer is not first and m.tokenizers.misses == 2
        assert lease.resident.tokenizer.pad_token == "<|endoftext|>"
        m.release(lease)
        await m.close()

    asyncio.run(scenario())


def test_tokenizer_cache_keys_on_side_files_not_weights_and_keeps_the_most_recent(models_dir, tmp_path):
    import shutil

    from sllm.server.loading import TokenizerCache, side_files_digest

    a = models_dir / "gpt2-a"
    copy = tmp_path / "elsewhere"
    shutil.copytree(a, copy)
    assert side_files_digest(copy) == side_files_digest(a)  # a DRAM hit's side files land in a new directory
    next(copy.glob("partition-*.bin")).write_bytes(b"\0" * 4096)  # weights are not a tokenizer's input
    (copy / "tensor_index.json").write_text("{}")
    assert side_files_digest(copy) == side_files_digest(a)
    (copy / "special_tokens_map.json").write_text('{"pad_token": "<|endoftext|>"}')
    assert side_files_digest(copy) != side_files_digest(a)

    cache = TokenizerCache(capacity=1)
    t_a = cache.get("a", a)
    assert cache.get("a", a) is t_a and cache.hits == 1
    cache.get("b", a)  # capacity 1: "a" is dropped
    assert cache.get("a", a) is not t_a and cache.misses == 3
    none = TokenizerCache(capacity=0)
    assert none.get("a", a) is not none.get("a", a)


def test_a_prefetched_tokenizer_is_parsed_once_and_a_get_meanwhile_waits_for_it(models_dir, monkeypatch):
    """The node starts an SSD copy's tokenizer parse with its fetch (prefetch); the load's get
    that comes while the parse runs waits for it instead of parsing a second time."""
    import time

    import transformers

    from sllm.server.loading import TokenizerCache

    real, calls = transformers.AutoTokenizer.from_pretrained, []

    def slow(path, *a, **kw):
        calls.append(path)
        time.sleep(0.3)
        return real(path, *a, **kw)

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", slow)
    cache = TokenizerCache()
    t = cache.prefetch("gpt2-a", models_dir / "gpt2-a")
    time.sleep(0.05)
    got = cache.get("gpt2-a", models_dir / "gpt2-a")  # while the prefetch parses
    t.join(10)
    assert len(calls) == 1 and (cache.hits, cache.misses) == (1, 1) and cache.get("gpt2-a", models_dir / "gpt2-a") is got
    assert TokenizerCache(0).prefetch("gpt2-a", models_dir / "gpt2-a") is None
    bad = cache.prefetch("nope", models_dir / "missing")  # a failure is left for the load's own get
    bad.join(10)
    assert not bad.is_alive() and cache.held() == ["gpt2-a"]
