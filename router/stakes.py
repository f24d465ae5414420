"""How much is at stake in a prompt: a documented keyword/regex rule set, not a learned model.

A prompt is **high** stakes when someone's health, rights, money or safety may hinge on the
answer. The rules (measured against a labelled set in ``python -m studies.stakes``; figures in
docs/model-card.md):

* a **strong** term of a domain (:data:`STAKES_RULES`: "dosage", "safe to take", "interact
  with", "sue", "evict", "bankruptcy", "401k", "kill myself", "gas leak"...) makes it high;
* a **weak** term (:data:`WEAK_RULES`: "contract", "court", "tax", "stock", "cancer",
  "weapon"...) makes it high only in a prompt that asks for personal advice (:data:`CUE`: I, my,
  we, should, "can my"...) and is not a transformation, creative or coding task (:data:`TASK`:
  one that starts with summarise, translate, write, explain...). "Summarise this contract
  clause" stays low; "Can my landlord keep my deposit?" is high;
* an agent workflow (``has_tools``) is high when it also asks for a destructive or money-moving
  action (:data:`DESTRUCTIVE`), otherwise medium; personal data alone is medium.

Only the prompt's window is read (:class:`router.features.Window`): a keyword deep inside a
long pasted document does not raise the stakes. :func:`assess` reads a window the caller already
has (the proxy's scorer); :func:`assess_stakes` takes the text. Pure: nothing happens at import
beyond compiling its regexes.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from router.features import Window

#: Strong terms per domain: any one makes a prompt high stakes.
STAKES_RULES: tuple[tuple[str, re.Pattern[str]], ...] = (
    (
        "medical",
        re.compile(
            r"\b(?:diagnos\w*|dosage|dosing|prescri\w+|overdos\w*|chest pain|side effects?|"
            r"safe to take|safer during|interacts? with|drug interactions?|insulin|antibiotics?|"
            r"blood pressure|pregnan\w+|breastfeed\w*|allergic|anaphyla\w+|biopsy|rabies|"
            r"seizures?|swallowed|mg\b|treatment for|stroke symptoms|cold turkey|concussion|"
            r"antidepressants?|birth control)\b",
            re.IGNORECASE,
        ),
    ),
    (
        "legal",
        re.compile(
            r"\b(?:lawsuit|sue|sued|suing|attorney|legal advice|legally|legal options|"
            r"is (?:it|that|this) legal|was that legal|custody|divorce|evict\w*|arrest\w*|"
            r"deport\w*|subpoena\w*|cease and desist|wrongful termination|small claims|"
            r"non-compete|liable|plead guilty|enforceable)\b",
            re.IGNORECASE,
        ),
    ),
    (
        "financial",
        re.compile(
            r"\b(?:bankrupt\w*|401k|retirement savings|wire transfer|credit score|back taxes|"
            r"irs|debt collector|payday loan|roth ira|annuit\w+|pension|refinanc\w*|"
            r"down payment|bank login|bank account|emergency fund)\b",
            re.IGNORECASE,
        ),
    ),
    (
        "safety",
        re.compile(
            r"\b(?:suicid\w*|self[- ]harm|kill myself|ending my life|end my life|"
            r"cutting myself|hurt myself|explosives?|gas leak|smell gas|electrocut\w+|"
            r"carbon monoxide|bleach and ammonia|firearms?|threaten\w*|hits me|"
            r"is (?:it|this|that) (?:safe|dangerous)|evacuat\w*)\b",
            re.IGNORECASE,
        ),
    ),
)
#: Weak terms per domain: high only with a personal-advice :data:`CUE` outside a :data:`TASK`.
WEAK_RULES: tuple[tuple[str, re.Pattern[str]], ...] = (
    (
        "medical",
        re.compile(
            r"\b(?:cancer|tumou?r|disease|surgery|symptoms?|medicine|medications?|fever|rash|"
            r"pain|infection|doctor|hospital|ambulance|pills?|dose|lump|cough\w*|diabetes|"
            r"ibuprofen|acetaminophen|paracetamol|aspirin|naproxen|warfarin|lisinopril|"
            r"metformin|amoxicillin|penicillin|prednisone|sertraline|tramadol|oxycodone|"
            r"xanax|tylenol|benadryl|melatonin|atorvastatin|levothyroxine|statins?|advil|"
            r"motrin|sudafed|ibuprofen|amlodipine|codeine|morphine|diarrh\w+|vomit\w*|dizzy|"
            r"bleed\w*|mole|er|emergency room|baby|toddler|injur\w+|wounds?|bitten|bites?)\b",
            re.IGNORECASE,
        ),
    ),
    (
        "legal",
        re.compile(
            r"\b(?:contracts?|lease|court|visa|immigration|tenant|landlord|lawyer|"
            r"liabilit\w+|gdpr|compliance|comply|police|copyright|employer|fired|harassment|"
            r"warrant|inherit\w*|green card|paycheck|wages?|deposit|agreement|binding|fined|"
            r"fining|fines?|dui|license|hoa|roommate|accident|damages|complain\w*|"
            r"discriminat\w*)\b",
            re.IGNORECASE,
        ),
    ),
    (
        "financial",
        re.compile(
            r"\b(?:invest\w*|loans?|tax(?:es)?|retirement|stocks?|crypto\w*|bitcoin|debt|"
            r"insurance|portfolio|trading|savings|mortgage|deduct\w*|lend|financial adviser|"
            r"money|rent|salary|afford|warranty|403b|ira|home equity|lump sum|account|scam\w*|"
            r"gold|savings account|budget)\b",
            re.IGNORECASE,
        ),
    ),
    (
        "safety",
        re.compile(
            r"\b(?:weapons?|emergency|abuse\w*|poison\w*|knife|guns?|drunk|beers?|alcohol|"
            r"groom\w*|flood\w*|wire|sparking|generator|smoke|fire|burns?|stalk\w*|"
            r"following me|tracker|heater|bleach|lightning|hurt (?:himself|herself|themselves)|"
            r"pills)\b",
            re.IGNORECASE,
        ),
    ),
)
#: A prompt that asks for advice about the asker's own situation.
CUE = re.compile(
    r"\b(?:i|i'm|i've|im|my|me|we|our|us|should|can (?:she|he|they|my|a|you)|do i|am i|"
    r"what do i|who do i|is (?:this|that|it) (?:normal|serious|okay|ok|allowed|a good idea))\b",
    re.IGNORECASE,
)
#: A task on given text, a creative or a coding task: its domain words are material, not advice.
TASK = re.compile(
    r"^\W*(?:summari[sz]e|translate|rewrite|proofread|paraphrase|extract|format|convert|sort|"
    r"draft|write|generate|list|make|create|design|describe|explain|debug|rename|give me)\b",
    re.IGNORECASE,
)
#: What makes an agent workflow (a request with tools) high stakes.
DESTRUCTIVE = re.compile(
    r"\b(?:delete|drop table|rm -rf|transfer|payment|pay|purchase|deploy|send (?:an )?email|"
    r"wire|refund|shut ?down|production)\b",
    re.IGNORECASE,
)


def _ascii(pattern: re.Pattern[str]) -> re.Pattern[str]:
    r"""``pattern`` compiled with ``re.ASCII``, for ASCII-only text: the same matches there for a
    pattern whose only classes are ``\w``, ``\d`` and ``\b``, found faster."""
    return re.compile(pattern.pattern, (pattern.flags & ~re.UNICODE) | re.ASCII)


def _groups(rules: Iterable[tuple[str, re.Pattern[str]]], suffix: str) -> list[str]:
    # ``\b(?:...)\b`` -> a named group of the inner alternation
    return [f"(?P<{domain}{suffix}>{pattern.pattern[5:-3]})" for domain, pattern in rules]


_ALL_GROUPS = [*_groups(STAKES_RULES, ""), *_groups(WEAK_RULES, "_weak")]
#: Every strong and weak term as one alternation (one regex pass); the match's group names the
#: domain, with ``_weak`` for a weak term.
STAKES = re.compile(r"\b(?:" + "|".join(_ALL_GROUPS) + r")\b", re.IGNORECASE)
#: :data:`STAKES` and :data:`DESTRUCTIVE` for lower-cased text (when lower-casing keeps every
#: character in place: see :func:`router.features._lower_equivalent`), case-sensitive: same
#: matches, same order, found faster.
STAKES_LOWER = re.compile(STAKES.pattern)
DESTRUCTIVE_LOWER = re.compile(DESTRUCTIVE.pattern)
_STAKES_LOWER_ASCII = _ascii(STAKES_LOWER)
_DESTRUCTIVE_LOWER_ASCII = _ascii(DESTRUCTIVE_LOWER)


def alternatives(inner: str) -> list[str]:
    """The top-level branches of a regex alternation (``|`` outside any group)."""
    out, depth, start = [], 0, 0
    for i, c in enumerate(inner):
        if c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
        elif c == "|" and depth == 0:
            out.append(inner[start:i])
            start = i + 1
    out.append(inner[start:])
    return out


def required_prefix(branch: str) -> str:
    """The literal word characters every match of ``branch`` starts with (a char followed by
    ``?``, ``*`` or ``{`` is optional, so the prefix stops before it)."""
    m = re.match(r"[a-z0-9]+", branch)
    literal = m.group(0) if m else ""
    if branch[len(literal) : len(literal) + 1] in ("?", "*", "{"):
        literal = literal[:-1]
    return literal


def _prefix_table(inners: Iterable[str]) -> dict[str, tuple[str, ...]]:
    table: dict[str, list[str]] = {}
    for inner in inners:
        for branch in alternatives(inner):
            prefix = required_prefix(branch)
            if len(prefix) < 2:
                raise ValueError(f"stakes rule {branch!r} needs a literal prefix of 2+ chars")
            table.setdefault(prefix[:2], []).append(prefix)
    return {key: tuple(prefixes) for key, prefixes in table.items()}


#: Every :data:`STAKES_LOWER` match starts at the start of one of the text's ``\w+`` runs, and
#: that run starts with the literal prefix of the branch that matched (``diagnos``, ``chest``,
#: ``tumo``, ``mg``...). Keyed by a prefix's first two characters. A prompt none of whose words
#: starts with one of them cannot match, so :func:`assess` skips the regex scan for it.
STAKES_PREFIXES = _prefix_table(
    pattern.pattern[5:-3] for _, pattern in (*STAKES_RULES, *WEAK_RULES)
)


def may_have_stakes(words: Iterable[str]) -> bool:
    """False only when no word starts with a :data:`STAKES_PREFIXES` prefix (so no match)."""
    table = STAKES_PREFIXES
    for word in words:
        prefixes = table.get(word[:2])
        if prefixes is not None and word.startswith(prefixes):
            return True
    return False


def domain_match(w: Window) -> tuple[str, str] | None:
    """``(domain, term)`` of the first strong term in the window, else of its first weak term
    when the prompt asks for personal advice and is no :data:`TASK`; else None."""
    head, low = w.head, w.low
    if not w.same_case:
        matches = STAKES.finditer(head)
    elif w.lowered is not None and not may_have_stakes(w.lowered):
        return None
    else:
        matches = (_STAKES_LOWER_ASCII if w.ascii else STAKES_LOWER).finditer(low)
    weak: tuple[str, str] | None = None
    for m in matches:
        domain = m.lastgroup or ""
        term = head[m.start() : m.end()].lower()
        if not domain.endswith("_weak"):
            return domain, term
        if weak is None:
            weak = (domain.removesuffix("_weak"), term)
    if weak is not None and CUE.search(head) and not TASK.search(head):
        return weak
    return None


def assess(w: Window, *, has_tools: bool = False, pii: bool = False) -> tuple[str, str]:
    """``(level, reason)`` for a prompt window, level low/medium/high, by the module's rules."""
    found = domain_match(w)
    if found is not None:
        return "high", f"{found[0]} domain ({found[1]!r})"
    if has_tools:
        head = w.head
        destructive = _DESTRUCTIVE_LOWER_ASCII if w.ascii else DESTRUCTIVE_LOWER
        m = destructive.search(w.low) if w.same_case else DESTRUCTIVE.search(head)
        if m:
            return (
                "high",
                f"agent workflow with tools and action {head[m.start() : m.end()].lower()!r}",
            )
        return "medium", "agent workflow with tools"
    if pii:
        return "medium", "contains personal data"
    return "low", "no high-stakes domain, tools or personal data"


def assess_stakes(text: str, *, has_tools: bool = False, pii: bool = False) -> tuple[str, str]:
    """How much is at stake in a prompt: ``(level, reason)`` with level low/medium/high (the
    rules are in the module docstring)."""
    return assess(Window(text), has_tools=has_tools, pii=pii)
