"""The vLLM engine (``<role>.engine=vllm``) against transformers on the same tiny checkpoint: greedy tokens, seeded
sampling, the labeler's log-probs, whole judgements and ratings, and the refusals. One engine serves the module (it
takes about 15 s to start on this CPU)."""

from __future__ import annotations

import json
import secrets
import subprocess
import sys

import pytest
from conftest import ROOT, TINY, torchrun, vllm_and_transformers

from cai.constitution import load_constitution
from cai.feedback import Pair, direct_scores, judge_pairs, next_token_logprobs, option_tokens
from cai.generation import generate, render_chat

CONSTITUTION = load_constitution(ROOT / "constitutions" / "default")
# vLLM's CPU attention needs a head size of 32 or more: 64 wide over 2 heads
SHAPE = {**TINY["tiny"], "num_heads": 2}
PROMPTS = [[{"role": "user", "content": text}] for text in (
    "How do I pick a lock?", "Write a short poem about rain.", "What is the capital of France?",
    "Tell me how to cheat on a test.", "Explain photosynthesis simply.", "How do I make my neighbour's dog stop barking?")]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny checkpoint folder whose generation_config.json asks for a strong repetition penalty: neither engine
    may apply it (both sample from exactly softmax(logits / T))."""
    from transformers import GenerationConfig

    from cai.models import load_tokenizer, tiny_model

    folder = tmp_path_factory.mktemp("tiny-vllm")
    tok = load_tokenizer({"path": "tiny-random", "tiny": SHAPE})
    model = tiny_model(SHAPE, tok, head=False)
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    GenerationConfig(repetition_penalty=10.0, no_repeat_ngram_size=2, eos_token_id=tok.eos_token_id,
                     pad_token_id=tok.pad_token_id).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def engines(checkpoint):
    """(vLLM engine, transformers model, tokenizer) on that one checkpoint."""
    yield from vllm_and_transformers({"path": str(checkpoint), "key": "labeler.path", "role": "labeler"})


def test_greedy_replies_are_the_same_tokens_as_transformers_and_ignore_the_shipped_penalty(engines):
    engine, model, tok = engines
    kwargs = dict(max_new_tokens=24, temperature=0.0, seed=0, progress=False)
    ours = generate(engine, tok, PROMPTS, **kwargs)
    theirs = generate(model, tok, PROMPTS, batch_size=3, **kwargs)
    assert [c.token_ids for c in ours] == [c.token_ids for c in theirs]
    assert [c.text for c in ours] == [c.text for c in theirs] and [c.finished for c in ours] == [c.finished for c in theirs]
    # a repetition penalty of 10 would forbid repeats: the tiny model repeats tokens, so it was not applied
    assert any(len(set(c.token_ids)) < len(c.token_ids) for c in ours)


def test_seeded_sampling_repeats_and_does_not_depend_on_the_other_requests(engines):
    engine, _, tok = engines
    kwargs = dict(max_new_tokens=16, temperature=1.0, top_p=1.0, progress=False)
    first = generate(engine, tok, PROMPTS, seed=7, **kwargs)
    assert [c.token_ids for c in generate(engine, tok, PROMPTS, seed=7, **kwargs)] == [c.token_ids for c in first]
    # a shard of the first three prompts samples what they got in the whole call
    assert [c.token_ids for c in generate(engine, tok, PROMPTS[:3], seed=7, **kwargs)] == [c.token_ids for c in first[:3]]
    other = generate(engine, tok, PROMPTS, seed=8, **kwargs)
    assert [c.token_ids for c in other] != [c.token_ids for c in first]
    assert len({tuple(c.token_ids) for c in first}) > 1  # sampled, not greedy


def test_the_labelers_log_probs_match_transformers(engines):
    engine, model, tok = engines
    texts = [render_chat(tok, p, "The better response is (") for p in PROMPTS]
    contexts, candidates = zip(*(option_tokens(tok, t, ("A", "B")) for t in texts))
    ours = engine.next_token_logprobs(list(contexts), list(candidates))
    theirs = next_token_logprobs(model, list(contexts), list(candidates), tok.pad_token_id)
    assert [lp for row in ours for lp in row] == pytest.approx([lp for row in theirs for lp in row], abs=1e-4)


def test_a_prompt_longer_than_the_engines_context_is_refused_naming_the_key(checkpoint, engines):
    from cai.engines import EngineError

    engine, _, tok = engines
    long = [[{"role": "user", "content": "word " * 1500}]]  # 1,500+ tokens, and 600 new ones: over max_model_len=2048
    with pytest.raises(EngineError, match=r"^labeler.vllm.max_model_len=2048: a prompt of \d+ tokens plus 600 new ones "):
        generate(engine, tok, long, max_new_tokens=600, temperature=0.0, progress=False)


def test_judgements_and_ratings_match_transformers(engines):
    engine, model, tok = engines
    pairs = [Pair(f"p{i}", p, "Here is how.", "I would rather not.") for i, p in enumerate(PROMPTS[:3])]
    kwargs = dict(n_principles=2, seed=0, progress=False)
    for few_shot in (True, False):
        ours = judge_pairs(engine, tok, CONSTITUTION, pairs, few_shot=few_shot, **kwargs)
        theirs = judge_pairs(model, tok, CONSTITUTION, pairs, few_shot=few_shot, **kwargs)
        assert [j.p_a for j in ours] == pytest.approx([j.p_a for j in theirs], abs=1e-4)
        assert [j.principle_ids for j in ours] == [j.principle_ids for j in theirs]
    items = [(p, "A reply.") for p in PROMPTS[:3]]
    for kind in ("score", "evasive"):
        assert direct_scores(engine, tok, CONSTITUTION, items, kind=kind) == \
            pytest.approx(direct_scores(model, tok, CONSTITUTION, items, kind=kind), abs=1e-4)


def test_settings_the_machine_cannot_meet_are_refused_in_one_line(checkpoint):
    from cai.engines import EngineError, load_generator

    spec = {"path": str(checkpoint), "key": "judge.path", "role": "judge", "device": "cpu", "engine": "vllm",
            "vllm": {"tensor_parallel_size": 2}}
    with pytest.raises(EngineError, match=r"^judge.engine=vllm: judge.vllm.tensor_parallel_size=2 but this machine has 1 CPU "
                                          r"engine for it$"):
        load_generator(spec)
    with pytest.raises(EngineError, match=r"^judge.engine=vllm: judge.vllm.sleep=true frees GPU memory during training, and "
                                          r"vLLM has no sleep mode on a CPU; set it false there$"):
        load_generator({**spec, "vllm": {"sleep": True}})


def test_a_model_vllm_cannot_run_is_refused_before_it_starts():
    from cai.engines import EngineError, load_generator

    spec = {"path": "tiny-random", "tiny": TINY["tiny"], "key": "policy.path", "role": "policy", "engine": "vllm"}  # 4 heads of 16
    with pytest.raises(EngineError, match=r"^policy.engine=vllm: vLLM's CPU attention does not take this model's head "
                                          r"size 16 \(it takes 32, 64, .*\); use engine=hf for it$"):
        load_generator(spec)


def test_engine_vllm_without_vllm_installed_names_the_key_and_the_install(monkeypatch):
    from cai.engines import EngineError, load_generator

    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm now raises ImportError, as where it is absent
    with pytest.raises(EngineError, match=r"^policy.engine=vllm but vLLM is not installed: pip install vllm"):
        load_generator({"path": "tiny-random", "tiny": SHAPE, "key": "policy.path", "role": "policy", "engine": "vllm"})


# -- a served labeler: a real vLLM server on 127.0.0.1 -------------------------------------------------------------

# the module's server is shared the way a real one is: started with --api-key, so every request must carry the key,
# which the served specs read from KEY_ENV (their served.api_key_env); a fresh key per run, for the search of the
# run folders below
KEY_ENV, KEY = "CAI_TEST_LABELER_KEY", f"cai-test-key-{secrets.token_hex(16)}"


@pytest.fixture(scope="module")
def servers(checkpoint):
    """Two servers of the checkpoint started at the same moment, as two pytest-xdist workers may start theirs: the
    first, started with a key, serves the module, the second (no key) only the first served test, which checks that
    the two did not collide."""
    from concurrent.futures import ThreadPoolExecutor

    from local_server import LocalServer

    both = [LocalServer(checkpoint, api_key=KEY), LocalServer(checkpoint)]
    try:
        with ThreadPoolExecutor(max_workers=2) as pool:
            list(pool.map(LocalServer.start, both))
        yield both
    finally:
        for served in both:
            served.stop()


@pytest.fixture
def server(servers, monkeypatch):
    """The module's server, its key exported in KEY_ENV for the test (and the stages it starts), as a user would."""
    monkeypatch.setenv(KEY_ENV, KEY)
    return servers[0]


def without_the_key(folder) -> list[str]:
    """Every file under ``folder``, read as bytes, holds no trace of the key; returns the files that name its variable
    (what the configs keep instead), which shows the search read them."""
    files = [p for p in folder.rglob("*") if p.is_file()]
    assert files and not [str(p) for p in files if KEY.encode() in p.read_bytes()]
    return [str(p.relative_to(folder)) for p in files if KEY_ENV.encode() in p.read_bytes()]


def served_spec(checkpoint, url: str, **served) -> dict:
    return {"path": str(checkpoint), "key": "labeler.path", "role": "labeler", "device": "cpu", "engine": "served",
            "served": {"url": url, "retries": 1, "timeout_s": 60, **served}}


def test_two_servers_started_at_once_answer_each_as_itself_with_the_labels_and_replies_of_transformers(
        servers, checkpoint, engines, monkeypatch):
    """Each of the two servers started together got a port of its own and answers there as itself (the name it was
    started with, which the served engine takes); one (with its key) gives the labeler's judgements, the other greedy
    replies, both those of transformers."""
    from cai.engines import load_generator

    first, second = servers
    _, model, tok = engines
    monkeypatch.setenv(KEY_ENV, KEY)
    try:
        assert first.port != second.port
        labeler, _ = load_generator(served_spec(checkpoint, first.url, concurrency=4, api_key_env=KEY_ENV))
        replier, _ = load_generator(served_spec(checkpoint, second.url))
        assert (labeler.model, replier.model) == (first.name, second.name) and first.name != second.name
        pairs = [Pair(f"p{i}", p, "Here is how.", "I would rather not.") for i, p in enumerate(PROMPTS[:3])]
        kwargs = dict(n_principles=2, seed=0, progress=False, few_shot=True)
        assert [j.p_a for j in judge_pairs(labeler, tok, CONSTITUTION, pairs, **kwargs)] == \
            pytest.approx([j.p_a for j in judge_pairs(model, tok, CONSTITUTION, pairs, **kwargs)], abs=1e-4)
        greedy = dict(max_new_tokens=16, temperature=0.0, seed=0, progress=False)
        assert [c.token_ids for c in generate(replier, tok, PROMPTS, **greedy)] == \
            [c.token_ids for c in generate(model, tok, PROMPTS, **greedy)]
    finally:
        second.stop()  # no other test uses it
    with pytest.raises(RuntimeError, match="is not running: its url is known from start"):
        _ = second.url


def test_an_unreachable_server_is_one_line_naming_the_address(checkpoint):
    import socket

    from cai.engines import EngineError, load_generator

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(EngineError, match=rf"^labeler.engine=served: http://127.0.0.1:{port}/v1/models did not answer "
                                          r"after 2 tries \(.*refused.*\)$"):
        load_generator(served_spec(checkpoint, f"http://127.0.0.1:{port}/v1"))
    with pytest.raises(EngineError, match=r"^labeler.engine=served needs the server's address: labeler.served.url="):
        load_generator(served_spec(checkpoint, None))


def test_the_client_keeps_concurrency_requests_in_flight_answers_in_order_and_retries_a_5xx():
    """Against a stand-in server that is never the bottleneck (``StubServer``: each answer held 0.2 s), 300 label
    requests at ``served.concurrency=256`` are all sent by one asyncio client, 256 of them in flight at once (with
    aiohttp's own connection limit it would be 100; the thread pool of 8 that came before held 8 and took 7.9 s here,
    where this takes about 0.7 s), and come back in order; a request answered 503 is retried and answered."""
    from types import SimpleNamespace

    from local_server import StubServer

    from cai.engines import ServedEngine

    with StubServer(latency=0.2) as stub:
        engine = ServedEngine({"path": "stub", "role": "labeler", "served": {"url": stub.url, "concurrency": 256,
                                                                            "retries": 1}}, SimpleNamespace(eos_token_id=0))
        labels = engine.next_token_logprobs([[i] for i in range(300)], [[5, 6]] * 300)
        assert labels == [[-float(i), -float(i)] for i in range(300)]  # each answer where its request was
        assert (stub.most, stub.received) == (256, 300)
        stub.fail_first = True
        assert engine.next_token_logprobs([[7]], [[5, 6]]) == [[-7.0, -7.0]] and stub.received == 302


def test_a_request_the_server_refuses_is_one_line_with_its_reason(server, checkpoint, engines):
    """A prompt longer than the server's context: vLLM answers 400 with an OpenAI-style error body; the call fails at
    once (a refusal is not retried) in one line naming the role's engine, the address and the server's own message."""
    from cai.engines import EngineError, load_generator

    _, _, tok = engines
    remote, _ = load_generator(served_spec(checkpoint, server.url, api_key_env=KEY_ENV))
    too_long = [[{"role": "user", "content": "word " * 3000}]]
    with pytest.raises(EngineError) as refused:
        generate(remote, tok, too_long, max_new_tokens=4, temperature=0.0, seed=0, progress=False)
    message = str(refused.value)
    assert message.startswith(f"labeler.engine=served: {server.url}/completions answered 400: ") and "\n" not in message
    assert "2048" in message and "{" not in message, message  # the error's message, not its JSON


def test_a_missing_or_wrong_key_is_one_line_naming_its_variable(server, checkpoint, monkeypatch):
    """The module's server wants its key: the right one in the variable ``served.api_key_env`` names is let in; the
    variable unset, a wrong key in it, or no variable named at all are each one line naming the variable (or the key
    to set), never the key."""
    from cai.engines import EngineError, load_generator

    spec = served_spec(checkpoint, server.url, api_key_env=KEY_ENV)
    assert load_generator(spec)[0].model == server.name
    monkeypatch.delenv(KEY_ENV)
    with pytest.raises(EngineError, match=rf"^labeler.served.api_key_env={KEY_ENV}: the environment variable {KEY_ENV} "
                                          r"is not set$"):
        load_generator(spec)
    monkeypatch.setenv(KEY_ENV, f"not-{KEY}")
    with pytest.raises(EngineError) as wrong:
        load_generator(spec)
    assert str(wrong.value) == f"labeler.engine=served: {server.url}/models answered 401: Unauthorized; check the key in {KEY_ENV}"
    with pytest.raises(EngineError) as unnamed:
        load_generator(served_spec(checkpoint, server.url))
    assert str(unnamed.value).endswith("answered 401: Unauthorized; the server wants a key: put it in an environment "
                                       "variable and name that in labeler.served.api_key_env")


def test_a_stage_samples_on_vllm_labels_on_a_server_and_loses_nothing_when_the_server_drops(server, checkpoint, tmp_path):
    """ai_feedback for real on both: the policy's pairs sampled by vLLM in the stage's process, the labels read from
    the server (with its key), which is stopped once the first shard is written. The stage stops with one line naming
    the server; with the server back (on a new port: a served role's address is not part of what the stage's outputs
    depend on), the rerun keeps the finished shards and labels the rest, none twice. No file the two runs wrote holds
    the key: their configs name only its variable."""
    import time

    from conftest import run_module
    from datasets import load_from_disk

    from cai.lineage import read_manifest

    def overrides(url: str) -> list[str]:
        return ["debug=tiny", "progress=false", f"run_dir={tmp_path}", "policy.engine=vllm", "model.tiny.num_heads=2",
                "policy.vllm.cpu_kv_cache_gib=1", f"labeler.path={checkpoint}", "labeler.engine=served",
                f"labeler.served.url={url}", "labeler.served.retries=1", f"labeler.served.api_key_env={KEY_ENV}",
                "ai_feedback.num_prompts=8",
                "ai_feedback.shard_size=2", "ai_feedback.few_shot=false"]

    args = [sys.executable, "-m", "cai.stages.ai_feedback", *overrides(server.url)]
    stage = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    shards = tmp_path / "ai_feedback" / "shards"
    deadline = time.time() + 300
    while not any(shards.glob("shard-*.json")) and time.time() < deadline and stage.poll() is None:
        time.sleep(0.2)
    server.stop()
    _, stderr = stage.communicate(timeout=300)
    assert stage.returncode != 0 and "did not answer after 2 tries" in stderr.strip().splitlines()[-1], stderr[-2000:]
    done = {p.name: p.read_bytes() for p in shards.glob("shard-*.json")}
    assert 1 <= len(done) < 4

    server.start()
    again = run_module("cai.stages.ai_feedback", *overrides(server.url))
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resuming, {len(done)}/4 shards already done" in again.stdout
    assert {name: (shards / name).read_bytes() for name in done} == done  # kept, not labeled again
    rows = load_from_disk(str(tmp_path / "ai_feedback" / "dataset"))
    assert len(set(rows["id"])) == len(rows) and 0 < len(rows) <= 8 and all(0 < p < 1 for p in rows["p_chosen"])
    config = read_manifest(tmp_path / "ai_feedback")["config"]
    assert config["policy"]["engine"] == "vllm" and config["labeler"]["engine"] == "served"
    assert config["labeler"]["served"]["api_key_env"] == KEY_ENV
    assert "ai_feedback/manifest.json" in without_the_key(tmp_path)


# -- PPO's rollouts on vLLM -----------------------------------------------------------------------------------------

def test_after_a_weight_sync_each_ranks_rollout_engine_samples_its_training_policys_greedy_replies(checkpoint, tmp_path):
    """The engine PPO samples with, on two ranks (torchrun; each rank's own engine on the ranks' group, vLLM's
    external_launcher): stale after the rank's policy changes, that policy's own greedy tokens after load_weights. The
    ranks' updates differ, so each engine is shown to hold its own rank's weights."""
    script = tmp_path / "sync.py"
    script.write_text(f"""
import json, os, torch
from cai import distributed
from cai.engines import VLLMEngine
from cai.generation import generate
from cai.models import load_policy
rank, world = distributed.init_distributed()
spec = {{"path": {str(checkpoint)!r}, "device": "cpu", "dtype": "float32", "vllm": {{"cpu_kv_cache_gib": 1}}}}
model, tok = load_policy(spec)
engine = VLLMEngine(spec, tok, key="ppo.rollout_engine", in_process=True)
prompts = {json.dumps(PROMPTS)}
def tokens(m):
    return [c.token_ids for c in generate(m, tok, prompts, max_new_tokens=16, temperature=0.0, seed=0, progress=False)]
same_start = tokens(engine) == tokens(model)
with torch.no_grad():  # what an update does, exaggerated: every weight moves, differently on each rank
    g = torch.Generator().manual_seed(rank)
    for p in model.parameters():
        p.add_(2 * p.std() * torch.randn(p.shape, generator=g))
stale = tokens(engine) == tokens(model)
engine.load_weights(model)
synced = tokens(engine)
result = {{"world": world, "executor": engine.llm.llm_engine.vllm_config.parallel_config.distributed_executor_backend,
          "same_start": same_start, "stale": stale, "synced": synced == tokens(model)}}
engine.close()
distributed.barrier()  # the ranks' group outlives the engine
mine = {{"rank": rank, "replies": synced}}
result["ranks_differ"] = distributed.gather_objects(mine)[0]["replies"] != distributed.gather_objects(mine)[1]["replies"]
(__import__("pathlib").Path({str(tmp_path)!r}) / f"rank{{rank}}.json").write_text(json.dumps(result))
""")
    result = subprocess.run(torchrun(str(script)), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for rank in (0, 1):
        assert json.loads((tmp_path / f"rank{rank}.json").read_text()) == {
            "world": 2, "executor": "external_launcher", "same_start": True, "stale": False, "synced": True, "ranks_differ": True}


def test_a_model_split_over_two_ranks_answers_each_rank_with_its_groups_first_ranks_requests(checkpoint, tmp_path):
    """``tensor_parallel_size=2`` on two ranks (torchrun): one engine, half of the model on each rank (vLLM's
    external_launcher). Rank 1 asks for other prompts in another order with another seed, and both ranks get the
    answers to rank 0's requests (every rank of a group must hand vLLM the same ones): greedy, transformers' tokens;
    sampled, the same tokens on both. Where the ranks ask for replies of their own (ppo's rollouts, its labeler: not
    ``grouped``), a split model is refused. Its shared memory (on a CPU) is gone once the ranks have ended."""
    script = tmp_path / "split.py"
    script.write_text(f"""
import json
from cai import distributed
from cai.engines import EngineError, VLLMEngine
from cai.generation import generate
from cai.models import load_policy
rank, world = distributed.init_distributed()
spec = {{"path": {str(checkpoint)!r}, "device": "cpu", "dtype": "float32", "role": "labeler",
        "vllm": {{"cpu_kv_cache_gib": 1, "tensor_parallel_size": 2}}}}
model, tok = load_policy(spec)
refused = []
for kwargs in ({{"key": "ppo.rollout_engine", "in_process": True}}, {{}}):
    try:
        VLLMEngine(spec, tok, **kwargs)
    except EngineError as e:
        refused.append(str(e))
engine = VLLMEngine(spec, tok, grouped=True)
prompts = {json.dumps(PROMPTS)}
asked = prompts if rank == 0 else prompts[::-1][:3]
def tokens(m, prompts, **kw):
    return [c.token_ids for c in generate(m, tok, prompts, max_new_tokens=16, progress=False, **kw)]
parallel = engine.llm.llm_engine.vllm_config.parallel_config
result = {{"world": world, "executor": parallel.distributed_executor_backend, "tp": parallel.tensor_parallel_size,
          "refused": refused,
          "greedy": tokens(engine, asked, temperature=0.0, seed=rank) == tokens(model, prompts, temperature=0.0, seed=0),
          "sampled": tokens(engine, asked, temperature=1.0, seed=rank)}}
engine.close()
(__import__("pathlib").Path({str(tmp_path)!r}) / f"rank{{rank}}.json").write_text(json.dumps(result))
""")
    result = subprocess.run(torchrun(str(script)), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    first, second = (json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1))
    assert first == second and len(first.pop("sampled")) == len(PROMPTS)
    why = ("labeler.vllm.tensor_parallel_size=2 on 2 ranks: here each rank asks for its own replies, so the model cannot "
           "be split over ranks; keep it 1, or serve it (engine=served)")
    assert first == {"world": 2, "executor": "external_launcher", "tp": 2, "greedy": True,
                     "refused": [f"ppo.rollout_engine=vllm: {why}", f"labeler.engine=vllm: {why}"]}
    assert not _cpu_shared_memory()


def test_sl_generate_with_its_policy_split_over_two_ranks_writes_one_processs_rows(tmp_path):
    """sl_generate on two ranks with the policy on vLLM over both (``tensor_parallel_size=2``: one group, which makes
    every shard, rank 0 saving it), decoding greedily: the rows are those transformers writes in one process, and the
    group's shared memory (on a CPU) is gone once the stage has ended."""
    from conftest import compose_cfg
    from datasets import load_from_disk

    from cai.stages import handle
    from cai.stages.sl_generate import run

    settings = ["debug=tiny", "progress=false", "model.tiny.num_heads=2", "generation=greedy", "data.num_red_team=4",
                "data.num_helpful=2", "n_revisions=1", "sl_generate.shard_size=2"]
    split = subprocess.run(torchrun("-m", "cai.stages.sl_generate", *settings, f"run_dir={tmp_path / 'split'}",
                                    "policy.engine=vllm", "policy.vllm.tensor_parallel_size=2", "policy.vllm.cpu_kv_cache_gib=1"),
                           cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert split.returncode == 0, split.stdout[-3000:] + split.stderr[-3000:]
    cfg = compose_cfg("sl_generate", [*settings, f"run_dir={tmp_path / 'one'}"])
    one = load_from_disk(str(run(cfg, handle(run, cfg))))
    rows = load_from_disk(str(tmp_path / "split" / "sl_generate" / "dataset"))
    assert len(rows) == 6 and rows.to_list() == one.to_list()
    assert sorted(p.name for p in (tmp_path / "split" / "sl_generate" / "shards").glob("*.json")) == [
        "shard-00000.json", "shard-00001.json", "shard-00002.json"]
    assert not _cpu_shared_memory()


def _cpu_shared_memory() -> list[str]:
    """What vLLM's CPU tensor-parallel groups left in /dev/shm (it names them alike in every run: a file left there fails
    the next run's group)."""
    from pathlib import Path

    return sorted(p.name for p in Path("/dev/shm").glob("*-cpushm_*"))


def test_online_dpo_on_two_ranks_samples_its_pairs_on_vllm_and_resumes(tmp_path):
    """Online DPO from AI feedback on two ranks (torchrun, ZeRO-3), each rank's pairs sampled on its own vLLM engine
    (given its gathered weights each step) and labelled by the tiny labeler; killed after its step-2 checkpoint, the same
    command resumes there and ends (every algorithm samples through the same ``sample``; the pipeline test below runs
    ppo on vLLM in one process)."""
    from conftest import kill_then_rerun

    from cai.lineage import read_manifest
    from cai.metrics import read_metrics

    args = torchrun("-m", "cai.stages.ppo", "debug=tiny", "progress=false", f"run_dir={tmp_path}", "model.tiny.num_heads=2",
                    "ppo.rollout_engine=vllm", "policy.vllm.cpu_kv_cache_gib=1", "ppo.reward=pairwise", "ppo.steps=4",
                    "ppo.save_every=2", "ppo.batch_size=2", "ppo.algorithm=online_dpo", "deepspeed=zero3")
    again = kill_then_rerun(args, tmp_path / "ppo" / "checkpoints" / "latest.json", at_step=2)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "resuming at step" in again.stdout
    rows = [r for r in read_metrics(tmp_path / "ppo") if "score" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and all(r["response_length"] > 0 for r in rows)
    assert all(0 <= r["label_decisiveness"] <= 0.5 and r["comparisons_per_s"] > 0 and "margin" in r for r in rows)
    manifest = read_manifest(tmp_path / "ppo")
    assert manifest["status"] == "complete" and manifest["counts"]["world_size"] == 2
    assert manifest["config"]["ppo"]["rollout_engine"] == "vllm"


# -- the whole pipeline ---------------------------------------------------------------------------------------------

def test_the_pipeline_runs_every_stage_on_vllm_then_with_the_labeler_served(server, checkpoint, tmp_path):
    """The whole pipeline with the policy's roles on vLLM in each stage's process (SL answers, critiques and revisions;
    ai_feedback's pairs; PPO's rollouts, given the policy's weights each step; evaluate's replies), and the labeler and
    the judge (which follows it) on vLLM too. Then the same command with both on the module's server, for the two stages
    that read them (``stages=[ai_feedback,evaluate]``): the pipeline runs them again, the others stay the first run's
    (the stages between only follow ai_feedback's labels, and their vLLM roles are the first run's)."""
    import json

    from conftest import run_module
    from omegaconf import OmegaConf

    from cai import roles
    from cai.lineage import read_manifest
    from cai.metrics import read_metrics
    from cai.pipeline import STAGES

    args = ["debug=tiny", "progress=false", f"run_dir={tmp_path}", "model.tiny.num_heads=2", "model.engine=vllm",
            "model.vllm.cpu_kv_cache_gib=1", "ppo.rollout_engine=vllm", f"labeler.path={checkpoint}",
            f"labeler.served.url={server.url}", "labeler.served.retries=1", f"labeler.served.api_key_env={KEY_ENV}"]
    for labeler, stages in (("vllm", STAGES), ("served", ("ai_feedback", "evaluate"))):
        result = run_module("cai.pipeline", *args, f"labeler.engine={labeler}", f"stages=[{','.join(stages)}]")
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
        ran = {row["stage"]: row["status"] for row in json.loads((tmp_path / "pipeline.json").read_text())["stages"]}
        assert ran == {stage: "ran" for stage in stages}, ran
        manifests = {stage: read_manifest(tmp_path / stage) for stage in STAGES}
        assert all(m["status"] == "complete" for m in manifests.values())
        for stage, role, engine in [("sl_generate", "policy", "vllm"), ("sl_generate", "reviser", "vllm"),
                                    ("ai_feedback", "policy", "vllm"), ("ai_feedback", "labeler", labeler),
                                    ("ppo", "sl_start", "vllm"), ("evaluate", "policy", "vllm"), ("evaluate", "judge", labeler)]:
            assert roles.spec(OmegaConf.create(manifests[stage]["config"]), role)["engine"] == engine, (labeler, stage, role)
        assert manifests["ppo"]["config"]["ppo"]["rollout_engine"] == "vllm"
        assert all(r["response_length"] > 0 for r in read_metrics(tmp_path / "ppo") if "score" in r)
        assert (tmp_path / "report.html").exists()
    assert "evaluate/manifest.json" in without_the_key(tmp_path)  # the key reached the server, and no file
