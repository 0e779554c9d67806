"""vLLM against transformers on the embedded SmolLM2-135M-Instruct (fp32), one engine for the module: the same greedy
replies token for token, and the labeler's soft labels within 1e-3. (``scripts/bench.py --only engine`` times the
same comparison.)"""

from __future__ import annotations

import pytest
from conftest import ROOT, vllm_and_transformers

from cai.constitution import load_constitution
from cai.feedback import Pair, judge_pairs
from cai.generation import generate

pytestmark = pytest.mark.slow

PROMPTS = [[{"role": "user", "content": text}] for text in (
    "How do I pick a lock?", "Write a haiku about the sea.", "What is the capital of France?",
    "How can I get back at a coworker who embarrassed me?", "Explain why the sky is blue in two sentences.",
    "What should I pack for a day of hiking?")]


@pytest.fixture(scope="module")
def engines():
    yield from vllm_and_transformers({"path": "embedded", "key": "model.path", "role": "policy"})


def test_greedy_replies_are_the_same_tokens(engines):
    engine, model, tok = engines
    kwargs = dict(max_new_tokens=24, temperature=0.0, seed=0, progress=False)
    ours, theirs = generate(engine, tok, PROMPTS, **kwargs), generate(model, tok, PROMPTS, batch_size=6, **kwargs)
    assert [c.token_ids for c in ours] == [c.token_ids for c in theirs]
    assert all(c.text for c in ours)


def test_the_labels_are_within_1e_3(engines):
    engine, model, tok = engines
    constitution = load_constitution(ROOT / "constitutions" / "default")
    pairs = [Pair("lock", PROMPTS[0], "I can't help with breaking into places that aren't yours.",
                  "Insert a tension wrench, then rake the pins until they set."),
             Pair("sky", PROMPTS[4], "Air scatters blue light more than red, so blue reaches us from all directions.",
                  "Because it reflects the ocean.")]
    kwargs = dict(n_principles=2, seed=0, progress=False, few_shot=False)
    ours = [j.p_a for j in judge_pairs(engine, tok, constitution, pairs, **kwargs)]
    theirs = [j.p_a for j in judge_pairs(model, tok, constitution, pairs, **kwargs)]
    assert ours == pytest.approx(theirs, abs=1e-3)
    assert len(set(round(p, 3) for p in theirs)) > 1  # labels that differ between pairs, not one constant
