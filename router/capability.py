"""Capability recognition as the proxy serves it: text -> probabilities over the capabilities.

A prompt's capability (:data:`router.scoring.CAPABILITIES`: coding, math, reasoning, extraction,
summarization, knowledge_qa, creative_writing, roleplay, chat) is read from a **static
embedding** (:mod:`router.embedding`: WordPiece tokens, a vector each from a table distilled
from all-MiniLM-L6-v2, pooled) through **one linear head**. The shipped head is a prototype
classifier: the cosine between the prompt and one prototype per capability, the mean of that
capability's :data:`DESCRIPTIONS`, with a softmax temperature fitted on the training rows.
Leave-one-source-out validation chose it (``python -m studies.capability_loso``): heads fitted
to the training sources' rows learn their formats and carried worse to a held-out source.

API:

* :class:`CapabilityModel` (here, numpy only): ``probabilities(text)`` is the vector over
  :data:`~router.scoring.CAPABILITIES` in that order, ``predict(text)`` its arg-max, ``logits``
  the head's decision values (``coef @ unit(embed(text) - center) + intercept``). It equals the
  fitted estimator's ``predict_proba`` (tested).
* :func:`load_capability` / :func:`save_capability`: a capability artifact directory::

      embedding.npz   the token table (float16) and its vocabulary (router.embedding), or
                      none: the sidecar then names a sibling's, ``../NAME/embedding.npz``
      head.npz        center (embedding width), coef (capabilities x width), intercept,
                      capabilities
      metadata.json   format, sha256 of both files, the table's provenance and licence,
                      library versions, training data and estimator settings

  Loading checks the format and each file's sha256 on the bytes it then reads, and refuses any
  mismatch with an :class:`~router.errors.ArtifactError`. The shipped head with the encoder is
  ``models/capability-v4`` (:func:`default_capability_path`).
* :class:`GatedCapability`, :func:`save_gate` / :func:`load_gate`: two capability artifacts in
  series (``models/capability-v5``: capability-v3, static, then capability-v4, encoder). The
  first one's probabilities stand where its largest reaches the gate's ``threshold``; the
  other prompts are read by the second. A gate directory holds only ``metadata.json`` (format
  :data:`GATE_FORMAT`), which names both members and pins each by its sidecar's sha256.
* :class:`SplitCapability`, :func:`save_split` / :func:`load_split`: two readers (heads or
  gates) over one prompt, one whose probabilities the routing score reads and one whose arg-max
  names the capability (``models/capability-v9``: capability-v5 scores, capability-v8 labels),
  each prompt vector computed once for both. Its directory, too, holds only ``metadata.json``
  (format :data:`SPLIT_FORMAT`). :func:`load_reader` loads any of the three kinds.
* The scikit-learn side, :class:`router.capability_training.CapabilityClassifier` (``fit``
  returns ``self``, fitted state ends in ``_``, ``classes_`` is CAPABILITIES), and the training
  entry point ``python -m router.capability_training`` live apart so that this module imports
  no scikit-learn.
* :data:`DESCRIPTIONS`: twenty short, generic requests per capability, written from the
  capability definitions rather than taken from any data source (and checked to be no
  MT-Bench question). They make the prototypes, so a capability that no training source covers
  (``extraction``: no commercial-use rows) or whose only source is held out is still recognised.

Nothing happens at import; no scikit-learn, scipy or torch.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from router.artifact import (
    METADATA_FILE,
    capability_dir,
    read_checked_npz,
    read_sidecar,
    sha256_file,
    write_npz,
    write_sidecar,
)
from router.embedding import StaticEmbedding, read_embedding, share_embedding, write_embedding
from router.encoder import ContextualEmbedding, read_encoder
from router.errors import ArtifactError
from router.locations import shipped
from router.scoring import CAPABILITIES

CAPABILITY_FORMAT = "tiergate-capability"
CAPABILITY_FORMAT_VERSION = 1
GATE_FORMAT = "tiergate-capability-gate"
GATE_FORMAT_VERSION = 1
SPLIT_FORMAT = "tiergate-capability-split"
SPLIT_FORMAT_VERSION = 1
HEAD_FILE = "head.npz"
DEFAULT_CAPABILITY_NAME = "capability-v4"

FloatArray = NDArray[np.float64]

#: Generic requests per capability, written from the capability definitions (no data source's
#: prompts); the prototype head's prototypes (see the module docstring).
DESCRIPTIONS: dict[str, tuple[str, ...]] = {
    "coding": (
        "Write a Python function that takes a list and returns it sorted.",
        "Fix the bug in this code.",
        "Implement a class in Java with a method that parses the input.",
        "Why does my JavaScript code throw an undefined error?",
        "Write a SQL query that selects the rows where the date is after 2020.",
        "Explain what this code snippet does.",
        "Refactor this function to make it faster and add unit tests.",
        "Write a program in C++ that reads a file and counts the words.",
        "How do I use an API with a library in Rust? Show an example.",
        "Translate this Python script into Go.",
        "Complete the function below.\n\ndef count_vowels(s: str) -> int:\n    "
        '"""Return the number of vowels in s."""',
        "def merge(a, b):\n    result = []\n    # TODO: merge two sorted lists\n    return result",
        "Write a bash script that renames all files in a directory.",
        "What is the time complexity of this algorithm, and how can I improve it?",
        "Write a regular expression that matches valid email addresses.",
        "Create a React component that shows a list of items with a search box.",
        "My program crashes with a segmentation fault. Here is the code: int *p = NULL; *p = 5;",
        "Write a function to find the longest common subsequence of two strings.",
        "How do I read a CSV file with pandas and group by a column?",
        "Implement a linked list with insert and delete operations.",
    ),
    "math": (
        "Solve for x: 3x + 5 = 20.",
        "Calculate the area of a triangle with sides 3, 4 and 5.",
        "What is the derivative of x^2 sin(x)?",
        "Prove that the square root of 2 is irrational.",
        "If a train travels 60 miles per hour for 2.5 hours, how far does it go?",
        "Find the probability of rolling two sixes with two dice.",
        "Compute the integral of 1/(1+x^2) from 0 to 1.",
        "How many ways can 5 people be arranged in a row?",
        "A shop sells apples at $2 each. How much do 7 apples cost after a 10% discount?",
        "Find all integer solutions of the equation.",
        "What is the sum of the first 100 positive integers?",
        "Simplify the expression (x^2 - 9)/(x - 3).",
        "Let $f(x) = 2x^2 + 3$. Find $f(4)$.",
        "John has 12 marbles and gives a third of them to his sister. How many does he have left?",
        "Find the eigenvalues of the matrix [[2, 1], [1, 2]].",
        "The sum of two numbers is 30 and their difference is 4. What are the numbers?",
        "What is the remainder when 2^100 is divided by 7?",
        "Find the volume of a sphere with radius 3 cm.",
        "Solve the system of equations: x + y = 10, 2x - y = 2.",
        "A rectangle has a perimeter of 24 and a length twice its width. Find its area.",
    ),
    "reasoning": (
        "Is the following argument logically valid? Answer valid or invalid.",
        "Three people sit in a row. Alice is left of Bob and Bob is not in the "
        "middle. Who is where?",
        "Determine whether the statement is true or false, reasoning step by step.",
        "If all A are B and some B are C, does it follow that some A are C?",
        "Solve this riddle and explain your reasoning.",
        "Which of the options follows logically from the premises?",
        "A person tells the truth or lies. Does the last one tell the truth?",
        "Work out the order of events from the clues given.",
        "Think step by step: what is the most likely cause of this situation?",
        "Puzzle: find which box contains the prize using the hints.",
        "What conclusion can be drawn from these statements, if any?",
        "Every student in the club plays chess. Maria is not in the club. Does Maria play chess?",
        "Is this a sound deduction, or does the conclusion go beyond the evidence?",
        "A is the father of B. B is the sister of C. How is C related to A?",
        "If it rains, the ground is wet. The ground is wet. Did it rain? Explain.",
        "Explain why the following plan would or would not work, considering each "
        "constraint in turn.",
        "Tom is taller than Sam, and Sam is taller than Ann. Who is the shortest?",
        "Two statements contradict each other. Which one must be false, and why?",
        "Identify the flaw in the following reasoning.",
        "Given these clues, deduce who owns the fish.",
    ),
    "extraction": (
        "Extract all the names and dates mentioned in the following text.",
        "From the passage below, list every company and its revenue as JSON.",
        "Identify the key entities in this document and return them in a table.",
        "Pull out the email addresses and phone numbers from this message.",
        "Read the text and answer: what does the author say about the budget?",
        "Extract the main keywords from the following article.",
        "Parse this invoice and output the total, the date and the vendor.",
        "Based on the paragraph, which products are mentioned and at what prices?",
        "Return the fields title, author and year from each of these records.",
        "Find the sentences in the text that mention the deadline.",
        "From the customer messages below, extract each order number and the problem reported.",
        "Find every date in the contract below and say what happens on it.",
        "From this job posting, extract the required skills, the salary and the location.",
        "List the ingredients and their quantities from the recipe text below.",
        "Read the following news report and identify the people, organisations and "
        "places mentioned.",
        "What are the main topics discussed in this text? Give one word for each.",
        "Convert the information in this paragraph into a structured table.",
        "According to the passage, when was the company founded and by whom?",
        "Extract every number and its unit from the following report.",
        "Which of the following sentences express a negative opinion? Return their indices.",
    ),
    "summarization": (
        "Summarize the following article in three sentences.",
        "Give me a short summary of this text.",
        "TL;DR of the following post:",
        "Condense this report into a few bullet points.",
        "Write a one-paragraph abstract of the paper below.",
        "Summarise the key points of this meeting transcript.",
        "What is the gist of this document? Keep it brief.",
        "Provide an executive summary of the following email thread.",
        "Shorten this passage while keeping the main ideas.",
        "Summarize the chapter below for a student.",
        "Please summarize the news story below in under 100 words.",
        "Here is a long conversation. Summarize what was decided.",
        "Read the following text and write a concise summary of its main argument.",
        "Create a brief overview of this research paper for a general audience.",
        "Sum up the plot of this story in two sentences.",
        "Can you give me the highlights of this report?",
        "Write a headline and a short summary for the article below.",
        "Summarize the reviews below: what do customers like and dislike?",
        "Reduce this text to its three most important points.",
        "Summarize this lecture transcript into study notes.",
    ),
    "knowledge_qa": (
        "Who wrote the novel Pride and Prejudice?",
        "What is the capital of Australia?",
        "When did the Second World War end?",
        "Explain how photosynthesis works.",
        "What causes the seasons on Earth?",
        "Which element has the atomic number 6?",
        "What is the difference between a virus and a bacterium?",
        "Describe the main causes of the French Revolution.",
        "How does a bill become a law in the United States?",
        "What is inflation in economics?",
        "who played the lead role in the movie titanic",
        "when was the eiffel tower built",
        "Which of the following is a mammal?\nA. Shark\nB. Dolphin\nC. Trout\nD. Octopus",
        "What is the function of the mitochondria in a cell?",
        "Explain the theory of relativity in simple terms.",
        "What were the main achievements of the Roman Empire?",
        "How do vaccines work?",
        "What is the difference between weather and climate?",
        "Who was the first person to walk on the moon?",
        "What does the Fifth Amendment of the US Constitution protect?",
    ),
    "creative_writing": (
        "Write a short story about a dragon who is afraid of the dark.",
        "Write a poem about the ocean at night.",
        "Compose song lyrics about lost love.",
        "Write a screenplay scene where two friends argue.",
        "Invent a villain for a comic book and describe their backstory.",
        "Write a haiku about autumn leaves.",
        "Write a persuasive blog post about travelling by train.",
        "Draft an engaging opening paragraph for a fantasy novel.",
        "Write a funny limerick about a cat.",
        "Write a story in the first person from the view of an old tree.",
        "Write an essay on why people should read more fiction.",
        "Compose a heartfelt letter to a friend you have not seen in years.",
        "Write a science fiction story set on a spaceship, about 500 words long.",
        "Write a speech for a wedding toast.",
        "Describe a sunset over the mountains in vivid, poetic language.",
        "Write a children's bedtime story about a brave little mouse.",
        "Write a rap verse about coffee.",
        "Create a dialogue between a detective and a suspect for a mystery novel.",
        "Write a product description for a handmade wooden chair that makes people want to buy it.",
        "Write a sonnet about time passing.",
    ),
    "roleplay": (
        "I want you to act as a travel guide. I will tell you my location.",
        "Pretend you are a pirate captain and talk to me like one.",
        "You are a job interviewer. Ask me questions for a developer position.",
        "Act as my therapist and respond to what I say.",
        "Imagine you are Sherlock Holmes and describe what you deduce about me.",
        "Role-play as a medieval knight meeting a stranger.",
        "From now on, respond as if you were a customer support agent.",
        "You are a famous chef. Greet me in character.",
        "Play the role of a teacher and I will be your student.",
        "Stay in character as a grumpy wizard for the rest of the conversation.",
        "I want you to act as a Linux terminal. I will type commands and you will "
        "reply with the output.",
        "Answer my questions as if you were a famous detective from an old novel.",
        "Pretend to be my grandmother telling me a story from her youth.",
        "You are an alien visiting Earth for the first time. Describe what you see.",
        "Act as a stand-up comedian and perform a short routine.",
        "Let's play a game: you are the dungeon master and I am an adventurer.",
        "Be a strict drill sergeant and motivate me to finish my homework.",
        "Speak like Shakespeare for the rest of this chat.",
        "You are a salesperson trying to sell me a car. Begin the conversation.",
        "Respond to me as if you were a cat.",
    ),
    "chat": (
        "Hello! How are you today?",
        "Hi there, what's up?",
        "Thanks, that was helpful!",
        "What do you think about dogs versus cats?",
        "I had a long day at work. Any advice to relax?",
        "Good morning!",
        "Can you recommend a good movie for tonight?",
        "Do you like music? What is your favourite song?",
        "Tell me something interesting.",
        "Should I learn to play the guitar or the piano?",
        "Hey, did you watch the game last night?",
        "I'm bored. Let's talk about something fun.",
        "What's your opinion on working from home?",
        "I just got a new puppy!",
        "Any tips for making new friends in a new city?",
        "Is it a good idea to take a gap year before college?",
        "Did you know that octopuses have three hearts?",
        "What should I cook for dinner tonight?",
        "How was your weekend?",
        "I'm feeling a bit down today.",
    ),
}


def default_capability_path() -> Path:
    """The shipped head with the encoder: ``models/capability-v4`` of the checkout or the wheel
    (the shipped router reads it through the gate ``models/capability-v5``, inside the split
    ``models/capability-v9``)."""
    return shipped("models", DEFAULT_CAPABILITY_NAME)


def softmax(z: FloatArray) -> FloatArray:
    """Probabilities from logits along the last axis."""
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    out: FloatArray = e / e.sum(axis=-1, keepdims=True)
    return out


def unit(x: FloatArray) -> FloatArray:
    """``x`` scaled to unit length along its last axis (rows of zeros stay zero)."""
    norm = np.sqrt((x * x).sum(axis=-1, keepdims=True))
    out: FloatArray = x / np.where(norm > 0.0, norm, 1.0)
    return out


class CapabilityModel:
    """The capability model's serving form: a static embedding and a linear head, numpy only.

    A prompt's logits are ``coef @ unit(embed(text) - center) + intercept``: its embedding
    (:meth:`router.embedding.StaticEmbedding.embed`), centred on the training prompts' mean and
    rescaled to unit length, through one linear map. ``coef`` is (capabilities x embedding
    width), ``center`` one value per embedding column, ``intercept`` one per capability, in the
    order of ``capabilities``, which must be :data:`~router.scoring.CAPABILITIES`.
    """

    def __init__(  # noqa: PLR0917 (the arrays of a head, in their file's order)
        self,
        embedding: StaticEmbedding,
        center: NDArray[Any],
        coef: NDArray[Any],
        intercept: NDArray[Any],
        capabilities: tuple[str, ...] = CAPABILITIES,
        version: str = DEFAULT_CAPABILITY_NAME,
    ) -> None:
        if tuple(capabilities) != CAPABILITIES:
            raise ValueError(f"capability head: classes {list(capabilities)}, not CAPABILITIES")
        n, width = len(CAPABILITIES), embedding.width
        if center.shape != (width,) or coef.shape != (n, width) or intercept.shape != (n,):
            raise ValueError("capability head: center/coef/intercept do not fit the embedding")
        if not all(np.isfinite(a).all() for a in (center, coef, intercept)):
            raise ValueError("capability head: NaN or infinite coefficients")
        self.embedding = embedding
        self.center: FloatArray = np.asarray(center, dtype=np.float64)
        self.coef: FloatArray = np.asarray(coef, dtype=np.float64)
        self.intercept: FloatArray = np.asarray(intercept, dtype=np.float64)
        self.capabilities = CAPABILITIES
        self.version = version

    @property
    def costly(self) -> bool:
        """Whether reading a prompt runs the encoder (milliseconds, not microseconds)."""
        return isinstance(self.embedding, ContextualEmbedding)

    def logits(self, text: str) -> FloatArray:
        """The head's decision values for one prompt, one per capability."""
        return self.logits_of(self.embedding.embed(text))

    def logits_of(self, vector: FloatArray) -> FloatArray:
        """The head's decision values for a prompt vector :attr:`embedding` already gave."""
        out: FloatArray = self.coef @ unit(vector - self.center)
        out += self.intercept
        return out

    def probabilities(self, text: str) -> FloatArray:
        """P(capability | text), in :data:`~router.scoring.CAPABILITIES` order."""
        return softmax(self.logits(text))

    def predict(self, text: str) -> str:
        """The most probable capability of one prompt."""
        return self.capabilities[int(np.argmax(self.logits(text)))]


def save_capability(
    model: CapabilityModel,
    directory: str | Path,
    metadata: Mapping[str, Any] | None = None,
    *,
    share: str | Path | None = None,
) -> Path:
    """Write ``model`` as a capability artifact (module docstring) into ``directory``, which
    must not exist yet (a new version is a new directory; a live one is never edited). With
    ``share``, a sibling capability artifact over the same embedding, the new one reads that
    artifact's embedding file rather than carrying a copy."""
    d = Path(directory)
    if share is not None:
        owner = Path(share)
        meta = read_sidecar(owner, kind=CAPABILITY_FORMAT, version=CAPABILITY_FORMAT_VERSION)
        embedding_entry = share_embedding(d, owner, meta.get("embedding"), model.embedding)
    d.mkdir(parents=True)
    if share is None:
        embedding_entry = write_embedding(d, model.embedding)
    head = {
        "center": model.center,
        "coef": model.coef,
        "intercept": model.intercept,
        "capabilities": np.array(model.capabilities),
    }
    meta = {
        **(metadata or {}),
        "format": CAPABILITY_FORMAT,
        "format_version": CAPABILITY_FORMAT_VERSION,
        "version": d.name,
        "embedding": embedding_entry,
        "head": {"file": HEAD_FILE, "sha256": write_npz(d / HEAD_FILE, head)},
        **(
            {"encoder": model.embedding.entry()}
            if isinstance(model.embedding, ContextualEmbedding)
            else {}
        ),
        "numpy": np.__version__,
    }
    write_sidecar(d, meta)
    return d


def load_capability(directory: str | Path | None = None) -> CapabilityModel:
    """The capability model of an artifact directory (default: the shipped one), checked as the
    module docstring says; an :class:`ArtifactError` says what does not fit."""
    d = Path(directory) if directory is not None else default_capability_path()
    meta = read_sidecar(d, HEAD_FILE, kind=CAPABILITY_FORMAT, version=CAPABILITY_FORMAT_VERSION)
    entry = meta.get("head")
    if not isinstance(entry, dict) or entry.get("file") != HEAD_FILE:
        raise ArtifactError(f"{d}: its sidecar names no {HEAD_FILE}")
    embedding = read_embedding(d, meta.get("embedding"))
    if "encoder" in meta:
        try:
            embedding = read_encoder(embedding, meta["encoder"])
        except ArtifactError as exc:
            raise ArtifactError(f"{d}: {exc}") from exc
    head = read_checked_npz(d / HEAD_FILE, entry.get("sha256"))
    try:
        return CapabilityModel(
            embedding,
            head["center"],
            head["coef"],
            head["intercept"],
            tuple(str(c) for c in head["capabilities"]),
            str(meta.get("version", d.name)),
        )
    except (KeyError, ValueError) as exc:
        raise ArtifactError(f"{d / HEAD_FILE}: unusable capability head ({exc})") from exc


class GatedCapability:
    """Two capability models in series: ``first``'s probabilities where its largest is at least
    ``threshold``, else ``then``'s. With a static ``first`` and an encoder ``then``
    (capability-v3, capability-v4), the encoder reads only the prompts the table is unsure of;
    ``python -m studies.capability_gate`` chose the threshold leave-one-source-out."""

    def __init__(
        self,
        first: CapabilityModel,
        then: CapabilityModel,
        threshold: float,
        version: str = "gate",
    ) -> None:
        if first.capabilities != then.capabilities:
            raise ValueError("capability gate: its two models order their capabilities apart")
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"capability gate: threshold {threshold!r} is not in (0, 1]")
        self.first, self.then, self.threshold = first, then, float(threshold)
        self.capabilities = first.capabilities
        self.version = version

    @property
    def costly(self) -> bool:
        """Whether reading a prompt may run the encoder (either member's)."""
        return self.first.costly or self.then.costly

    def sure(self, first: FloatArray) -> bool:
        """Whether ``first``'s probabilities for a prompt stand (their largest reaches the
        threshold), so ``then`` need not read it."""
        return float(first.max()) >= self.threshold

    def probabilities(self, text: str) -> FloatArray:
        """P(capability | text), in :data:`~router.scoring.CAPABILITIES` order."""
        p = self.first.probabilities(text)
        return p if self.sure(p) else self.then.probabilities(text)

    def reads_second(self, text: str) -> bool:
        """Whether :meth:`probabilities` reads ``text`` through ``then`` (``first`` unsure)."""
        return not self.sure(self.first.probabilities(text))

    def predict(self, text: str) -> str:
        """The most probable capability of one prompt."""
        return self.capabilities[int(np.argmax(self.probabilities(text)))]


def _member(directory: Path) -> dict[str, str]:
    return {"name": directory.name, "sha256": sha256_file(directory / METADATA_FILE)}


def save_gate(
    directory: str | Path,
    first: str | Path,
    then: str | Path,
    threshold: float,
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Write a gate over the capability artifacts ``first`` and ``then`` (siblings of
    ``directory`` or shipped ones) into ``directory``, which must not exist yet; both are
    loaded first, so a gate over models that do not fit together is never written."""
    d, a, b = Path(directory), Path(first), Path(then)
    GatedCapability(load_capability(a), load_capability(b), threshold)
    d.mkdir(parents=True)
    meta = {
        **(metadata or {}),
        "format": GATE_FORMAT,
        "format_version": GATE_FORMAT_VERSION,
        "version": d.name,
        "gate": {"threshold": float(threshold), "first": _member(a), "then": _member(b)},
    }
    write_sidecar(d, meta)
    return d


def _pinned(d: Path, entry: object, role: str) -> Path:
    # The directory of the member a gate or split sidecar names as ``role``, refused unless its
    # sidecar is the one pinned by sha256.
    if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
        raise ArtifactError(f"{d / METADATA_FILE}: names no {role} capability model")
    where = capability_dir(d, entry["name"])
    pinned = (where / METADATA_FILE).is_file() and sha256_file(where / METADATA_FILE) == entry.get(
        "sha256"
    )
    if not pinned:
        raise ArtifactError(
            f"{d}: its {role} capability model {where} is missing or not the pinned one"
        )
    return where


def load_gate(directory: str | Path) -> GatedCapability:
    """The gate in ``directory``: each member found as :func:`router.artifact.capability_dir`
    finds a router's capability model and refused unless its sidecar is the pinned one."""
    d = Path(directory)
    meta = read_sidecar(d, kind=GATE_FORMAT, version=GATE_FORMAT_VERSION)
    gate = meta.get("gate")
    if not isinstance(gate, dict) or not isinstance(gate.get("threshold"), int | float):
        raise ArtifactError(f"{d / METADATA_FILE}: names no gate threshold")
    first, then = (load_capability(_pinned(d, gate.get(role), role)) for role in ("first", "then"))
    try:
        return GatedCapability(
            first, then, float(gate["threshold"]), str(meta.get("version", d.name))
        )
    except ValueError as exc:
        raise ArtifactError(f"{d}: unusable capability gate ({exc})") from exc


def _format(directory: str | Path) -> object:
    # The format a sidecar claims (its other fields are not checked), or None.
    try:
        meta = json.loads((Path(directory) / METADATA_FILE).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return meta.get("format") if isinstance(meta, dict) else None


def is_gate(directory: str | Path) -> bool:
    """Whether ``directory``'s sidecar says it is a gate (its other fields are not checked)."""
    return _format(directory) == GATE_FORMAT


def is_split(directory: str | Path) -> bool:
    """Whether ``directory``'s sidecar says it is a split reader (other fields not checked)."""
    return _format(directory) == SPLIT_FORMAT


Reader = CapabilityModel | GatedCapability


class SplitCapability:
    """Two capability readers over one prompt: ``score``'s probabilities feed the routing score
    (what a router's head and a profile estimate were fitted on), ``label``'s arg-max names the
    capability (what the policy, ``classify`` and the local profile's entry read).

    A capability model that recognises categories better can move the probabilities a routing
    head had learnt to rank by (``python -m studies.capability_v6``), so the two roles may be
    filled by different models. Members whose embeddings read alike
    (:meth:`router.embedding.StaticEmbedding.reads_like`) share one prompt vector, so the
    encoder runs at most once per prompt."""

    def __init__(self, score: Reader, label: Reader, version: str = "split") -> None:
        if score.capabilities != label.capabilities:
            raise ValueError("capability split: its two readers order their capabilities apart")
        self.score, self.label = score, label
        self.capabilities = score.capabilities
        self.version = version
        models = [m for r in (score, label) for m in _members(r)]
        #: Per member (by position in ``models``), the index of the first member reading alike.
        self._alike = [
            next(j for j, o in enumerate(models) if o.embedding.reads_like(m.embedding))
            for m in models
        ]
        self._models = models

    @property
    def costly(self) -> bool:
        """Whether reading a prompt may run the encoder (any member's)."""
        return any(m.costly for m in self._models)

    def read(self, text: str) -> tuple[FloatArray, FloatArray]:
        """The score's probabilities and the label's, each member's vector computed once."""
        vectors: dict[int, FloatArray] = {}

        def probabilities(i: int) -> FloatArray:
            k = self._alike[i]
            if k not in vectors:
                vectors[k] = self._models[k].embedding.embed(text)
            return softmax(self._models[i].logits_of(vectors[k]))

        out = []
        first = 0
        for reader in (self.score, self.label):
            p = probabilities(first)
            if isinstance(reader, GatedCapability):
                p = p if reader.sure(p) else probabilities(first + 1)
                first += 2
            else:
                first += 1
            out.append(p)
        return out[0], out[1]

    def probabilities(self, text: str) -> FloatArray:
        """The score's P(capability | text), in :data:`~router.scoring.CAPABILITIES` order."""
        return self.score.probabilities(text)

    def reads_second(self, text: str) -> bool:
        """Whether :meth:`read` runs a gate's second model for ``text`` (either gate unsure)."""
        return any(
            isinstance(r, GatedCapability) and r.reads_second(text)
            for r in (self.score, self.label)
        )

    def predict(self, text: str) -> str:
        """The label's most probable capability of one prompt."""
        return self.capabilities[int(np.argmax(self.label.probabilities(text)))]


def _members(reader: Reader) -> list[CapabilityModel]:
    return [reader.first, reader.then] if isinstance(reader, GatedCapability) else [reader]


def save_split(
    directory: str | Path,
    score: str | Path,
    label: str | Path,
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Write a split reader over the capability artifacts (heads or gates) ``score`` and
    ``label`` into ``directory``, which must not exist yet; both are loaded first."""
    d, a, b = Path(directory), Path(score), Path(label)
    SplitCapability(_load_member(a), _load_member(b))
    d.mkdir(parents=True)
    meta = {
        **(metadata or {}),
        "format": SPLIT_FORMAT,
        "format_version": SPLIT_FORMAT_VERSION,
        "version": d.name,
        "split": {"score": _member(a), "label": _member(b)},
    }
    write_sidecar(d, meta)
    return d


def _load_member(directory: Path) -> Reader:
    return load_gate(directory) if is_gate(directory) else load_capability(directory)


def load_split(directory: str | Path) -> SplitCapability:
    """The split reader in ``directory``, each member (a head or a gate) found as a gate's are
    and refused unless its sidecar is the pinned one."""
    d = Path(directory)
    meta = read_sidecar(d, kind=SPLIT_FORMAT, version=SPLIT_FORMAT_VERSION)
    split = meta.get("split")
    if not isinstance(split, dict):
        raise ArtifactError(f"{d / METADATA_FILE}: names no score and label readers")
    score, label = (_load_member(_pinned(d, split.get(r), r)) for r in ("score", "label"))
    try:
        return SplitCapability(score, label, str(meta.get("version", d.name)))
    except ValueError as exc:
        raise ArtifactError(f"{d}: unusable capability split ({exc})") from exc


def load_reader(directory: str | Path) -> CapabilityModel | GatedCapability | SplitCapability:
    """The capability model, the gate or the split reader in ``directory``."""
    return load_split(directory) if is_split(directory) else _load_member(Path(directory))
