"""Capability recognition: the numpy serving form answers exactly as the fitted estimator, the
proxy's loader needs no scikit-learn, and a tampered artifact is refused."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from sklearn.base import clone

from router.artifact import METADATA_FILE, load_capability_model, write_npz
from router.capability import (
    HEAD_FILE,
    CapabilityModel,
    GatedCapability,
    SplitCapability,
    default_capability_path,
    is_gate,
    is_split,
    load_capability,
    load_reader,
    save_capability,
    save_gate,
    save_split,
)
from router.capability_training import CapabilityClassifier
from router.embedding import EMBEDDING_FILE, StaticEmbedding, embedding_path
from router.encoder import ContextualEmbedding
from router.errors import ArtifactError
from router.scoring import CAPABILITIES
from tests.test_capability_training import TRAIN

REPO = Path(__file__).resolve().parent.parent

ARTICLE = (
    "The city council met on Tuesday to discuss the new budget. Members argued about funding "
    "for parks, schools and road repairs. The mayor proposed raising property taxes by two "
    "percent, while several council members wanted to cut spending instead. After three hours "
    "of debate, the council agreed to delay the vote until next month."
)
SAMPLE = [
    "",
    "zzqx vvkk",
    "Write a haiku about rain.",
    "def add(a, b): return a + b  # why does this fail?",
    "Summarise the following article: " + "the market rose again today. " * 300,
    "Naïve café résumé — ünïcödé, 数学, emoji 🙂",
    "Pretend you are a pirate and tell me about your ship.",
]


@pytest.fixture(scope="module")
def shipped() -> CapabilityModel:
    return load_capability()


@pytest.fixture(scope="module")
def fitted(shipped: CapabilityModel) -> CapabilityClassifier:
    texts, labels = zip(*TRAIN, strict=True)
    return CapabilityClassifier(shipped.embedding).fit(list(texts), list(labels))


def test_serving_form_answers_exactly_as_predict_proba(
    fitted: CapabilityClassifier, tmp_path: Path
) -> None:
    expected = fitted.predict_proba(SAMPLE)
    assert list(fitted.classes_) == list(CAPABILITIES)
    assert expected.shape == (len(SAMPLE), len(CAPABILITIES))
    served = save_capability(fitted.serving(), tmp_path / "cap-t1")
    loaded = load_capability(served)
    assert loaded.version == "cap-t1"
    for text, row, label in zip(SAMPLE, expected, fitted.predict(SAMPLE), strict=True):
        assert np.abs(loaded.probabilities(text) - row).max() <= 1e-12
        assert loaded.predict(text) == label


def test_every_capability_has_a_column_even_without_rows(shipped: CapabilityModel) -> None:
    # Without the descriptions only four capabilities have rows; the columns stay CAPABILITIES
    # and the missing ones are never predicted.
    texts, labels = zip(*TRAIN, strict=True)
    model = CapabilityClassifier(shipped.embedding, descriptions=False).fit(
        list(texts), list(labels)
    )
    proba = model.predict_proba(SAMPLE)
    missing = [CAPABILITIES.index(c) for c in ("reasoning", "extraction", "roleplay")]
    assert proba[:, missing].max() < 1e-9
    assert set(model.predict(SAMPLE)) <= {"coding", "math", "creative_writing", "chat"}
    assert clone(model).get_params()["descriptions"] is False


@pytest.mark.parametrize(
    ("prompt", "capability"),
    [
        ("Write a poem about the first snow of the year.", "creative_writing"),
        ("Give me a short summary of the meeting notes I pasted earlier.", "summarization"),
        ("Write a function in Python that checks whether a string is a palindrome.", "coding"),
        ("What is 17 * 23 + 4? Show the steps.", "math"),
        ("I want you to act as a tour guide in Rome and stay in character.", "roleplay"),
        ("Who painted the Mona Lisa?", "knowledge_qa"),
        ("Hi! How are you doing today?", "chat"),
        ("List all the dates and company names mentioned in the following email.", "extraction"),
    ],
)
def test_shipped_model_recognises_plain_requests(
    shipped: CapabilityModel, prompt: str, capability: str
) -> None:
    assert shipped.predict(prompt) == capability


def test_a_pasted_article_to_summarise_ranks_summarization_in_the_top_two(
    shipped: CapabilityModel,
) -> None:
    # A known weakness (docs/model-card.md): two of the three pools then read the article, so
    # extraction competes with summarization.
    p = shipped.probabilities("Summarize this article in two sentences:\n\n" + ARTICLE)
    top2 = {CAPABILITIES[i] for i in np.argsort(p)[-2:]}
    assert "summarization" in top2


def test_the_capability_loader_imports_no_sklearn() -> None:
    script = """
import json, sys
from router.capability import load_capability
model = load_capability()
p = model.probabilities("Write a haiku about autumn.")
print(json.dumps({
    "sum": float(p.sum()),
    "top": model.predict("Write a haiku about autumn."),
    "loaded": sorted(m for m in ("sklearn", "scipy", "joblib", "torch") if m in sys.modules),
}))
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TIERGATE_")}
    out = subprocess.run(
        [sys.executable, "-c", script],
        check=False,
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
    )
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert got["loaded"] == []
    assert abs(got["sum"] - 1.0) < 1e-9 and got["top"] == "creative_writing"


@pytest.mark.parametrize("member", [EMBEDDING_FILE, HEAD_FILE])
def test_loading_refuses_a_tampered_file(
    fitted: CapabilityClassifier, tmp_path: Path, member: str
) -> None:
    d = save_capability(fitted.serving(), tmp_path / "cap-t2")
    load_capability(d)  # intact: loads
    if member == EMBEDDING_FILE:
        table = fitted.embedding_.table.astype(np.float16)
        table[1000] += np.float16(0.5)  # one token's vector nudged
        write_npz(d / member, {"table": table, "vocab": np.array(fitted.embedding_.vocab)})
    else:
        coef = fitted.coef_.copy()
        coef[CAPABILITIES.index("coding")] *= -1.0
        write_npz(
            d / member,
            {"coef": coef, "intercept": fitted.intercept_, "capabilities": np.array(CAPABILITIES)},
        )
    with pytest.raises(ArtifactError, match="sha256"):
        load_capability(d)


def test_loading_refuses_a_foreign_sidecar(fitted: CapabilityClassifier, tmp_path: Path) -> None:
    d = save_capability(fitted.serving(), tmp_path / "cap-t3")
    meta = json.loads((d / METADATA_FILE).read_text())
    (d / METADATA_FILE).write_text(json.dumps({**meta, "format": "tiergate-classifier"}))
    with pytest.raises(ArtifactError, match="tiergate-capability"):
        load_capability(d)


def test_resaving_the_shipped_model_writes_the_same_bytes(
    shipped: CapabilityModel, tmp_path: Path
) -> None:
    d = save_capability(shipped, tmp_path / "capability-copy")
    home = default_capability_path()
    entry = json.loads((home / METADATA_FILE).read_text())["embedding"]
    assert (d / EMBEDDING_FILE).read_bytes() == embedding_path(home, entry).read_bytes()
    assert (d / HEAD_FILE).read_bytes() == (home / HEAD_FILE).read_bytes()


def test_the_shipped_capability_models_carry_one_embedding_file() -> None:
    # Every capability model over the MiniLM table reads capability-v1's file: the wheel and
    # the image carry 15 MB once, not once per model.
    models = REPO / "models"
    copies = sorted(p.parent.name for p in models.glob(f"capability-v*/{EMBEDDING_FILE}"))
    assert copies == ["capability-v1"]
    for d in sorted(d for d in models.glob("capability-v*") if not (is_gate(d) or is_split(d))):
        entry = json.loads((d / METADATA_FILE).read_text())["embedding"]
        assert embedding_path(d, entry) == d.parent / "capability-v1" / EMBEDDING_FILE
        load_capability(d)


def test_a_new_model_can_share_a_siblings_embedding(
    fitted: CapabilityClassifier, tmp_path: Path
) -> None:
    owner = save_capability(fitted.serving(), tmp_path / "cap-a")
    d = save_capability(fitted.serving(), tmp_path / "cap-b", share=owner)
    assert not (d / EMBEDDING_FILE).exists()
    got = load_capability(d)
    np.testing.assert_array_equal(
        got.probabilities("Write a poem."), fitted.predict_proba(["Write a poem."])[0]
    )
    # The shared file is still checked against the reader's sidecar.
    table = fitted.embedding_.table.astype(np.float16)
    table[7] += np.float16(0.5)
    write_npz(owner / EMBEDDING_FILE, {"table": table, "vocab": np.array(fitted.embedding_.vocab)})
    with pytest.raises(ArtifactError, match="sha256"):
        load_capability(d)


def test_sharing_refuses_another_embedding(fitted: CapabilityClassifier, tmp_path: Path) -> None:
    owner = save_capability(fitted.serving(), tmp_path / "cap-a")
    # The shipped embedding (static table and encoder) with one token's row moved.
    other = copy.copy(fitted.embedding_)
    other.table = other.table.copy()
    other.table[3] += 1.0
    changed = CapabilityModel(
        other,
        fitted.center_,
        fitted.coef_,
        fitted.intercept_,
    )
    with pytest.raises(ValueError, match="not the one"):
        save_capability(changed, tmp_path / "cap-b", share=owner)
    assert not (tmp_path / "cap-b").exists()


@pytest.mark.parametrize(
    "name",
    [
        "../../elsewhere/embedding.npz",
        "/tmp/embedding.npz",
        "../cap-a/other.npz",
        "../../embedding.npz",
    ],
)
def test_a_sidecar_cannot_name_an_embedding_outside_the_models(
    fitted: CapabilityClassifier, tmp_path: Path, name: str
) -> None:
    d = save_capability(fitted.serving(), tmp_path / "models" / "cap-a")
    meta = json.loads((d / METADATA_FILE).read_text())
    meta["embedding"]["file"] = name
    (d / METADATA_FILE).write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match=r"names no embedding\.npz"):
        load_capability(d)


@pytest.fixture(scope="module")
def other(shipped: CapabilityModel) -> CapabilityClassifier:
    # A second head over the same table, fitted without the descriptions: it disagrees with
    # ``fitted`` often enough to tell which one a gate read.
    texts, labels = zip(*TRAIN, strict=True)
    return CapabilityClassifier(shipped.embedding, descriptions=False).fit(
        list(texts), list(labels)
    )


def test_a_gate_reads_its_second_model_only_where_the_first_is_unsure(
    fitted: CapabilityClassifier, other: CapabilityClassifier
) -> None:
    first, then = fitted.serving(), other.serving()
    tops = sorted(float(first.probabilities(t).max()) for t in SAMPLE)
    threshold = (tops[2] + tops[3]) / 2  # three prompts below, the rest above
    gate = GatedCapability(first, then, threshold, "cap-gate")
    went = []
    for text in SAMPLE:
        p1, p2 = first.probabilities(text), then.probabilities(text)
        assert not np.array_equal(p1, p2)
        sure = float(p1.max()) >= threshold
        np.testing.assert_array_equal(gate.probabilities(text), p1 if sure else p2)
        assert gate.reads_second(text) is not sure
        assert gate.predict(text) == CAPABILITIES[int(np.argmax(p1 if sure else p2))]
        went.append(sure)
    assert went.count(False) == 3
    assert first.costly and gate.costly  # the shipped table with the encoder, as capability-v4
    with pytest.raises(ValueError, match="threshold"):
        GatedCapability(first, then, 0.0)


def test_a_gate_is_saved_and_loaded_with_its_members_pinned(
    fitted: CapabilityClassifier, other: CapabilityClassifier, tmp_path: Path
) -> None:
    a = save_capability(fitted.serving(), tmp_path / "cap-a")
    b = save_capability(other.serving(), tmp_path / "cap-b", share=a)
    d = save_gate(tmp_path / "cap-gate", a, b, 0.6, {"chosen_by": "test"})
    assert sorted(p.name for p in d.iterdir()) == [METADATA_FILE]  # members are not copied
    assert is_gate(d) and not is_gate(a)
    gate = load_reader(d)
    assert isinstance(gate, GatedCapability)
    assert (gate.version, gate.threshold) == ("cap-gate", 0.6)
    assert isinstance(load_capability_model(d), GatedCapability)  # what routers load
    assert isinstance(load_reader(a), CapabilityModel)
    want = GatedCapability(fitted.serving(), other.serving(), 0.6)
    for text in SAMPLE:
        np.testing.assert_array_equal(gate.probabilities(text), want.probabilities(text))
    # A member refitted in place is not the one the gate was chosen over: refused.
    shutil.rmtree(b)
    save_capability(fitted.serving(), b, share=a)
    with pytest.raises(ArtifactError, match=r"then capability model .* not the pinned one"):
        load_reader(d)
    shutil.rmtree(b)
    with pytest.raises(ArtifactError, match="missing"):
        load_reader(d)


def test_a_gate_sidecar_without_a_threshold_is_refused(
    fitted: CapabilityClassifier, tmp_path: Path
) -> None:
    a = save_capability(fitted.serving(), tmp_path / "cap-a")
    d = save_gate(tmp_path / "cap-gate", a, a, 0.9)
    meta = json.loads((d / METADATA_FILE).read_text())
    del meta["gate"]["threshold"]
    (d / METADATA_FILE).write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match="threshold"):
        load_reader(d)
    with pytest.raises(ValueError, match="threshold"):
        save_gate(tmp_path / "cap-gate-2", a, a, 1.5)
    assert not (tmp_path / "cap-gate-2").exists()


def test_a_split_scores_with_one_reader_and_labels_with_the_other(
    fitted: CapabilityClassifier, other: CapabilityClassifier, monkeypatch: pytest.MonkeyPatch
) -> None:
    first, then = fitted.serving(), other.serving()
    tops = sorted(float(first.probabilities(t).max()) for t in SAMPLE)
    score = GatedCapability(first, then, (tops[2] + tops[3]) / 2)
    split = SplitCapability(score, then, "cap-split")
    assert split.costly and split.capabilities == CAPABILITIES
    # All three members read one embedding: each prompt is embedded (the encoder run) once.
    calls: list[str] = []
    embed = first.embedding.embed
    monkeypatch.setattr(first.embedding, "embed", lambda t: calls.append(t) or embed(t))
    labels_differ = 0
    for text in SAMPLE:
        q, labelled = split.read(text)
        assert calls == [text]
        calls.clear()
        np.testing.assert_allclose(q, score.probabilities(text), rtol=0, atol=1e-12)
        np.testing.assert_allclose(labelled, then.probabilities(text), rtol=0, atol=1e-12)
        calls.clear()
        np.testing.assert_array_equal(split.probabilities(text), score.probabilities(text))
        assert split.predict(text) == CAPABILITIES[int(np.argmax(then.probabilities(text)))]
        assert split.reads_second(text) is score.reads_second(text)  # the label is no gate
        labels_differ += int(np.argmax(q) != np.argmax(labelled))
        calls.clear()
    assert labels_differ > 0  # the two readers disagree somewhere, so the test tells them apart


def test_embeddings_read_alike_only_over_the_same_table_tokenizer_and_encoder(
    shipped: CapabilityModel,
) -> None:
    emb = shipped.embedding
    assert isinstance(emb, ContextualEmbedding)
    static = StaticEmbedding(emb.table, emb.vocab, tokenizer=emb.tokenizer)
    assert emb.reads_like(emb) and static.reads_like(
        StaticEmbedding(emb.table, emb.vocab, tokenizer=emb.tokenizer)
    )
    assert not static.reads_like(emb) and not emb.reads_like(static)
    assert not static.reads_like(
        StaticEmbedding(emb.table.copy(), emb.vocab, tokenizer=emb.tokenizer)
    )
    other_window = ContextualEmbedding(static, emb.encoder, head_tokens=64, tail_tokens=32)
    assert not emb.reads_like(other_window)
    same = ContextualEmbedding(
        static, emb.encoder, head_tokens=emb.head_tokens, tail_tokens=emb.tail_tokens
    )
    assert emb.reads_like(same)


def test_a_split_is_saved_and_loaded_with_its_members_pinned(
    fitted: CapabilityClassifier, other: CapabilityClassifier, tmp_path: Path
) -> None:
    a = save_capability(fitted.serving(), tmp_path / "cap-a")
    b = save_capability(other.serving(), tmp_path / "cap-b", share=a)
    g = save_gate(tmp_path / "cap-gate", a, b, 0.6)
    d = save_split(tmp_path / "cap-split", g, b, {"chosen_by": "test"})
    assert sorted(p.name for p in d.iterdir()) == [METADATA_FILE]
    assert is_split(d) and not is_split(g) and not is_gate(d)
    split = load_reader(d)
    assert isinstance(split, SplitCapability) and split.version == "cap-split"
    assert isinstance(split.score, GatedCapability) and isinstance(split.label, CapabilityModel)
    assert isinstance(load_capability_model(d), SplitCapability)  # what routers load
    for text in SAMPLE:
        np.testing.assert_array_equal(split.probabilities(text), load_reader(g).probabilities(text))
        assert split.predict(text) == load_reader(b).predict(text)
    shutil.rmtree(b)
    save_capability(fitted.serving(), b, share=a)
    with pytest.raises(ArtifactError, match=r"not the pinned one"):
        load_reader(d)
    meta = json.loads((d / METADATA_FILE).read_text())
    del meta["split"]
    (d / METADATA_FILE).write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match="names no score and label"):
        load_reader(d)
