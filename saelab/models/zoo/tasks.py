"""The seven algorithmic tasks of the zoo: vocabulary, seeded generator, probe variable, architecture and recipe.

These are the "Monthly Algorithmic Problems in Mech Interp" (ARENA, 2023–24), re-implemented from their
definitions. Each task is one `Task` value: plain data plus a vectorised generator

    generate(n, generator, split) -> TaskBatch     tokens [n pos], labels [n pos], the positions that are scored,
                                                    the positions that are judged, and the probe variable

`labels[b, p]` is what the model's output at position `p` must be (a class of `task.outputs`); it is
`IGNORE` where `scored` is False. The loss is the cross-entropy on scored positions; accuracy is the argmax on
`judged` positions (a subset of the scored ones: in `trigrams` only the planted trigrams can be predicted).
Where a task is next-token prediction (`sum`, `sorted_list`, `trigrams`) the outputs are the input vocabulary and
`labels[:, p] = tokens[:, p + 1]`; the other tasks are classifications with their own output labels.

Each task also names one intermediate variable of its algorithm (`variable`, `variable_mask`): a class per position,
or a real number where `probe.classes` is empty. `saelab zoo eval` fits a linear probe for it at every hook.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from saelab.errors import SaelabError

IGNORE = -100
"""The label of a position that is not scored (torch's cross_entropy ignore_index)."""


@dataclass(frozen=True)
class TaskBatch:
    tokens: Tensor  # [batch pos] int64
    labels: Tensor  # [batch pos] int64, IGNORE where not scored
    scored: Tensor  # [batch pos] bool: positions in the loss
    judged: Tensor  # [batch pos] bool: positions in the accuracy (⊆ scored)
    variable: Tensor  # [batch pos] int64 class or float value of the probe variable
    variable_mask: Tensor  # [batch pos] bool: where the variable is defined


@dataclass(frozen=True)
class ZooArchitecture:
    """The transformer: TransformerLens fields, with d_head = d_model / n_heads."""

    n_layers: int
    n_heads: int
    d_model: int
    d_mlp: int | None = None  # None: attention-only
    normalization: str | None = "LN"  # "LN" or None

    def tl_config(self, task: Task, seed: int = 0, device: str = "cpu") -> object:
        from transformer_lens import HookedTransformerConfig

        return HookedTransformerConfig(
            model_name=f"saelab-zoo-{task.name}",
            n_layers=self.n_layers,
            n_heads=self.n_heads,
            d_model=self.d_model,
            d_head=self.d_model // self.n_heads,
            d_mlp=self.d_mlp,
            attn_only=self.d_mlp is None,
            act_fn="relu" if self.d_mlp is not None else None,
            normalization_type=self.normalization,
            n_ctx=task.n_ctx,
            d_vocab=len(task.vocab),
            d_vocab_out=len(task.outputs),
            positional_embedding_type="standard",
            seed=seed,
            device=device,
            default_prepend_bos=False,
        )


@dataclass(frozen=True)
class Recipe:
    """How `saelab zoo train` trains a task: AdamW on fresh samples every step, warmup then cosine decay."""

    steps: int
    batch_size: int
    lr: float
    weight_decay: float = 0.01
    warmup_steps: int = 100


@dataclass(frozen=True)
class ProbeVariable:
    name: str
    description: str
    classes: tuple[str, ...] = ()  # empty: a real-valued variable (the probe is a linear regression)


@dataclass(frozen=True)
class Task:
    name: str
    summary: str
    algorithm: str  # what the model must compute, in words
    vocab: tuple[str, ...]  # input token labels, by id
    outputs: tuple[str, ...]  # output class labels, by id
    n_ctx: int
    architecture: ZooArchitecture
    recipe: Recipe
    probe: ProbeVariable
    generate: Callable[[int, torch.Generator, str], TaskBatch] = field(repr=False)

    def sample(self, n: int, seed: int, split: str = "train") -> TaskBatch:
        """`n` sequences from a fresh generator seeded with `seed`."""
        if split not in ("train", "heldout"):
            raise SaelabError(f"unknown split '{split}'; choose 'train' or 'heldout'")
        if n <= 0:
            raise SaelabError(f"the number of samples must be positive, got {n}")
        return self.generate(n, torch.Generator().manual_seed(seed), split)

    def encode(self, text: str) -> Tensor:
        """Token ids of a whitespace-separated input such as `3 1 4 1 5` (labels of `vocab`)."""
        index = {label: i for i, label in enumerate(self.vocab)}
        unknown = [word for word in text.split() if word not in index]
        if unknown:
            raise SaelabError(f"'{unknown[0]}' is not a token of {self.name}; its tokens are {' '.join(self.vocab)}")
        ids = [index[word] for word in text.split()]
        if not ids or len(ids) > self.n_ctx:
            raise SaelabError(f"{self.name} takes 1 to {self.n_ctx} tokens, got {len(ids)}")
        return torch.tensor(ids, dtype=torch.long)


def _randint(low: int, high: int, shape: tuple[int, ...], g: torch.Generator) -> Tensor:
    return torch.randint(low, high, shape, generator=g)


def _next_token_labels(tokens: Tensor, scored: Tensor) -> Tensor:
    labels = torch.full_like(tokens, IGNORE)
    labels[:, :-1] = torch.where(scored[:, :-1], tokens[:, 1:], IGNORE)
    return labels


def _positions(n: int, n_ctx: int, positions: range) -> Tensor:
    mask = torch.zeros(n, n_ctx, dtype=torch.bool)
    mask[:, positions.start : positions.stop] = True
    return mask


# ------------------------------------------------------------------------------------------------ palindromes

PAL_VALUES, PAL_HALF = 31, 10
PAL_START, PAL_END = PAL_VALUES, PAL_VALUES + 1


def _palindromes(n: int, g: torch.Generator, split: str) -> TaskBatch:
    half = _randint(0, PAL_VALUES, (n, PAL_HALF), g)
    second = half.flip(1).clone()
    # Half the sequences are palindromes; the rest change 1–10 positions of the second half, so that many
    # non-palindromes differ from a palindrome in one place only.
    mutate = torch.rand(n, generator=g) < 0.5
    n_changes = _randint(1, PAL_HALF + 1, (n, 1), g)
    ranks = torch.rand(n, PAL_HALF, generator=g).argsort(1).argsort(1)
    change = mutate[:, None] & (ranks < n_changes)
    second = torch.where(change, (second + _randint(1, PAL_VALUES, (n, PAL_HALF), g)) % PAL_VALUES, second)
    values = torch.cat([half, second], 1)
    tokens = torch.cat([torch.full((n, 1), PAL_START), values, torch.full((n, 1), PAL_END)], 1)
    n_ctx = tokens.shape[1]
    scored = torch.zeros(n, n_ctx, dtype=torch.bool)
    scored[:, -1] = True
    labels = torch.full_like(tokens, IGNORE)
    labels[:, -1] = (values == values.flip(1)).all(1).long()
    variable = torch.zeros_like(tokens)
    variable[:, 1:-1] = (values == values.flip(1)).long()
    return TaskBatch(tokens, labels, scored, scored, variable, _positions(n, n_ctx, range(1, n_ctx - 1)))


PALINDROMES = Task(
    name="palindromes",
    summary="is the sequence a palindrome? (classified at END)",
    algorithm=(
        "START, 20 values 0–30, END. At END the model says whether the 20 values read the same backwards: it must "
        "compare each position i of the second half with its mirror 21−i and output 'palindrome' only if no pair "
        "differs. Half the samples are palindromes; the others differ from one in 1–10 places."
    ),
    vocab=(*(str(v) for v in range(PAL_VALUES)), "START", "END"),
    outputs=("no", "yes"),
    n_ctx=2 * PAL_HALF + 2,
    architecture=ZooArchitecture(n_layers=2, n_heads=2, d_model=28),
    recipe=Recipe(steps=2000, batch_size=256, lr=3e-3),
    probe=ProbeVariable("equals_mirror", "token i equals its mirror token 21−i", ("differs", "equals")),
    generate=_palindromes,
)

# ------------------------------------------------------------------------------------------------ unique_char

UC_LETTERS = "abcdefghij"
UC_LEN = 19
UC_START = len(UC_LETTERS)


def _unique_char(n: int, g: torch.Generator, split: str) -> TaskBatch:
    # Each sequence draws from its own random subset of 2–10 letters, so every answer (and "none") is common.
    subsets = torch.rand(n, len(UC_LETTERS), generator=g).argsort(1)
    sizes = _randint(2, len(UC_LETTERS) + 1, (n, 1), g)
    picks = (torch.rand(n, UC_LEN, generator=g) * sizes).long()
    letters = subsets.gather(1, picks)
    counts = torch.nn.functional.one_hot(letters, len(UC_LETTERS)).cumsum(1)  # [n, p, letter]: count so far
    # once[b, p, q]: the letter at q (q ≤ p) has occurred exactly once among the first p+1 letters.
    once = counts.gather(2, letters[:, None, :].expand(n, UC_LEN, UC_LEN)) == 1
    once &= torch.ones(UC_LEN, UC_LEN, dtype=torch.bool).tril()
    first = once.float().argmax(2)
    answer = torch.where(once.any(2), letters.gather(1, first) + 1, 0)  # output 0 = none, 1 + letter
    tokens = torch.cat([torch.full((n, 1), UC_START), letters], 1)
    n_ctx = tokens.shape[1]
    scored = _positions(n, n_ctx, range(1, n_ctx))
    labels = torch.full_like(tokens, IGNORE)
    labels[:, 1:] = answer
    variable = torch.zeros_like(tokens)
    variable[:, 1:] = (counts.gather(2, letters[:, :, None])[..., 0] > 1).long()
    return TaskBatch(tokens, labels, scored, scored, variable, scored.clone())


UNIQUE_CHAR = Task(
    name="unique_char",
    summary="at each position, the first letter so far that occurs exactly once",
    algorithm=(
        "START, then 19 letters a–j. At every letter the model outputs the earliest letter of the prefix that has "
        "occurred exactly once so far, or 'none'. It must mark letters that repeat an earlier one (and so make "
        "that earlier one non-unique), then attend to the first position whose letter is still unmarked."
    ),
    vocab=(*UC_LETTERS, "START"),
    outputs=("none", *UC_LETTERS),
    n_ctx=UC_LEN + 1,
    architecture=ZooArchitecture(n_layers=2, n_heads=3, d_model=42),
    # The loss plateaus near 0.2 (accuracy 0.9, falling with the position) until about step 3500, then drops to
    # 0.01 in a few hundred steps; 3000 steps stopped on the plateau, 6000 leave room for a later drop.
    recipe=Recipe(steps=6000, batch_size=256, lr=3e-3),
    probe=ProbeVariable("seen_before", "the letter here occurred earlier in the sequence", ("new", "repeat")),
    generate=_unique_char,
)

# ------------------------------------------------------------------------------------------------------- sum

SUM_DIGITS = 4
SUM_PLUS, SUM_EQUALS = 10, 11


def _digits(numbers: Tensor) -> Tensor:
    """Little-endian decimal digits [n, SUM_DIGITS] of numbers < 10^SUM_DIGITS."""
    powers = 10 ** torch.arange(SUM_DIGITS)
    return numbers[:, None] // powers % 10


def _sum(n: int, g: torch.Generator, split: str) -> TaskBatch:
    modulus = 10**SUM_DIGITS
    a, b = _randint(0, modulus, (n,), g), _randint(0, modulus, (n,), g)
    tokens = torch.cat(
        [
            _digits(a),
            torch.full((n, 1), SUM_PLUS),
            _digits(b),
            torch.full((n, 1), SUM_EQUALS),
            _digits((a + b) % modulus),
        ],
        1,
    )
    n_ctx = tokens.shape[1]
    equals = 2 * SUM_DIGITS + 1
    scored = _positions(n, n_ctx, range(equals, equals + SUM_DIGITS))
    # The carry into answer digit i (i ≥ 1), at the position that predicts it.
    powers = 10 ** torch.arange(1, SUM_DIGITS)
    carries = ((a[:, None] % powers + b[:, None] % powers) >= powers).long()
    variable = torch.zeros_like(tokens)
    variable[:, equals + 1 : equals + SUM_DIGITS] = carries
    var_mask = _positions(n, n_ctx, range(equals + 1, equals + SUM_DIGITS))
    return TaskBatch(tokens, _next_token_labels(tokens, scored), scored, scored, variable, var_mask)


SUM = Task(
    name="sum",
    summary="4-digit addition, little-endian: the answer's digits are predicted",
    algorithm=(
        "a0 a1 a2 a3 + b0 b1 b2 b3 = c0 c1 c2 c3, every number least-significant digit first and c = (a + b) mod "
        "10^4. From '=' onwards the model predicts the next answer digit: c_i = (a_i + b_i + carry_i) mod 10, "
        "where carry_i is 1 when the digits below i overflow (a mod 10^i + b mod 10^i ≥ 10^i); it can read "
        "carry_i off c_(i−1) < a_(i−1) + b_(i−1)."
    ),
    vocab=(*(str(d) for d in range(10)), "+", "="),
    outputs=(*(str(d) for d in range(10)), "+", "="),
    n_ctx=3 * SUM_DIGITS + 2,
    architecture=ZooArchitecture(n_layers=2, n_heads=3, d_model=48),
    recipe=Recipe(steps=3000, batch_size=256, lr=3e-3),
    probe=ProbeVariable("carry", "the carry into the answer digit predicted here", ("no carry", "carry")),
    generate=_sum,
)

# ----------------------------------------------------------------------------------------------- sorted_list

SL_VALUES, SL_LEN = 51, 10
SL_SEP = SL_VALUES


def _sorted_list(n: int, g: torch.Generator, split: str) -> TaskBatch:
    values = torch.rand(n, SL_VALUES, generator=g).argsort(1)[:, :SL_LEN]  # distinct values
    tokens = torch.cat([values, torch.full((n, 1), SL_SEP), values.sort(1).values], 1)
    n_ctx = tokens.shape[1]
    scored = _positions(n, n_ctx, range(SL_LEN, 2 * SL_LEN))
    variable = torch.zeros_like(tokens)
    variable[:, SL_LEN + 1 : -1] = (tokens[:, SL_LEN + 2 :] - tokens[:, SL_LEN + 1 : -1] == 1).long()
    var_mask = _positions(n, n_ctx, range(SL_LEN + 1, 2 * SL_LEN))
    return TaskBatch(tokens, _next_token_labels(tokens, scored), scored, scored, variable, var_mask)


SORTED_LIST = Task(
    name="sorted_list",
    summary="after SEP, the input list of 10 distinct values 0–50, sorted",
    algorithm=(
        "10 distinct values 0–50, SEP, then the same values in increasing order. At SEP and at each sorted value v "
        "the model predicts the next one: the smallest input value greater than v (at SEP, the smallest). One "
        "attention layer must attend from v to that value, so its scores must rise with the key value above v and "
        "fall off below it."
    ),
    vocab=(*(str(v) for v in range(SL_VALUES)), "SEP"),
    outputs=(*(str(v) for v in range(SL_VALUES)), "SEP"),
    n_ctx=2 * SL_LEN + 1,
    architecture=ZooArchitecture(n_layers=1, n_heads=2, d_model=96),
    recipe=Recipe(steps=600, batch_size=256, lr=2e-3),
    probe=ProbeVariable("adjacent", "the next sorted value is exactly the current value + 1", ("gap > 1", "gap 1")),
    generate=_sorted_list,
)

# ---------------------------------------------------------------------------------------------------- cumsum

CS_MAX, CS_LEN = 5, 20


def _cumsum(n: int, g: torch.Generator, split: str) -> TaskBatch:
    values = _randint(-CS_MAX, CS_MAX + 1, (n, CS_LEN), g)
    running = values.cumsum(1)
    scored = torch.ones(n, CS_LEN, dtype=torch.bool)
    labels = running.sign() + 1  # 0 negative, 1 zero, 2 positive
    return TaskBatch(values + CS_MAX, labels, scored, scored, running.float(), scored.clone())


CUMSUM = Task(
    name="cumsum",
    summary="at each position, the sign of the running sum (tokens −5…5)",
    algorithm=(
        "20 values in −5…5. At each position the model says whether the sum of the values so far is negative, "
        "zero or positive. Attention averages the value embeddings of the prefix, which is the running sum divided "
        "by the position; the MLP then thresholds it at zero (and must tell an exact zero apart)."
    ),
    vocab=tuple(str(v) for v in range(-CS_MAX, CS_MAX + 1)),
    outputs=("negative", "zero", "positive"),
    n_ctx=CS_LEN,
    architecture=ZooArchitecture(n_layers=1, n_heads=1, d_model=24, d_mlp=8, normalization=None),
    recipe=Recipe(steps=800, batch_size=256, lr=3e-3),
    probe=ProbeVariable("running_sum", "the sum of the values up to and including this position"),
    generate=_cumsum,
)

# ---------------------------------------------------------------------------------------------------- caesar

CAESAR_LETTERS = "abcdefghijklmnopqrstuvwxyz"
CAESAR_LEN = 32
_COMMENT = re.compile(r"#([^\n]*)")
_DOCSTRING = re.compile(r'"""(.*?)"""', re.DOTALL)


@functools.lru_cache(maxsize=2)
def caesar_text(split: str) -> Tensor:
    """The plaintext: comments and docstrings of the built-in corpus, lower-cased, letters and single spaces.

    Returned as letter ids (0–25, space 26) of one long string; windows are cut from it at random offsets.
    """
    from saelab.models.builtin import builtin_texts

    pieces = []
    for source in builtin_texts(split):
        pieces += _COMMENT.findall(source) + _DOCSTRING.findall(source)
    text = " ".join(re.sub(r"[^a-z]+", " ", " ".join(pieces).lower()).split())
    if len(text) < 10 * CAESAR_LEN:
        raise SaelabError(f"the built-in corpus's {split} split has too little comment text for caesar")
    table = torch.full((256,), 26, dtype=torch.long)
    table[torch.tensor(list(CAESAR_LETTERS.encode()))] = torch.arange(26)
    return table[torch.frombuffer(bytearray(text.encode()), dtype=torch.uint8).long()]


def _caesar(n: int, g: torch.Generator, split: str) -> TaskBatch:
    text = caesar_text(split)
    starts = _randint(0, len(text) - CAESAR_LEN + 1, (n, 1), g)
    plain = text[starts + torch.arange(CAESAR_LEN)]
    shifts = _randint(0, 26, (n, 1), g)
    tokens = torch.where(plain < 26, (plain + shifts) % 26, plain)
    scored = torch.ones(n, CAESAR_LEN, dtype=torch.bool)
    labels = shifts.expand(n, CAESAR_LEN).clone()
    return TaskBatch(tokens, labels, scored, scored, plain, scored.clone())


CAESAR = Task(
    name="caesar",
    summary="the shift (0–25) of a Caesar-ciphered English text, at every position",
    algorithm=(
        "32 characters of English from the built-in corpus's comments and docstrings (letters and spaces), every "
        "letter shifted by the same secret k in 0–25. At each position the model guesses k from the letters so far: "
        "it matches their frequencies (and common short words) against English. Early positions cannot be sure, "
        "so accuracy is below 1 even for a perfect model."
    ),
    vocab=(*CAESAR_LETTERS, "_"),
    outputs=tuple(str(k) for k in range(26)),
    n_ctx=CAESAR_LEN,
    architecture=ZooArchitecture(n_layers=2, n_heads=2, d_model=48),
    recipe=Recipe(steps=3000, batch_size=128, lr=2e-3),
    probe=ProbeVariable("plaintext", "the plaintext character at this position", (*CAESAR_LETTERS, "_")),
    generate=_caesar,
)

# -------------------------------------------------------------------------------------------------- trigrams

TRI_VOCAB, TRI_LEN, TRI_COUNT, TRI_RATE = 75, 50, 50, 0.05


@functools.lru_cache(maxsize=1)
def trigram_table() -> Tensor:
    """The planted trigrams [TRI_COUNT, 3]: distinct (a, b) prefixes, each with its completion c. Fixed by seed 0."""
    g = torch.Generator().manual_seed(0)
    prefixes = torch.randperm(TRI_VOCAB * TRI_VOCAB, generator=g)[:TRI_COUNT]
    completions = _randint(0, TRI_VOCAB, (TRI_COUNT,), g)
    return torch.stack([prefixes // TRI_VOCAB, prefixes % TRI_VOCAB, completions], 1)


def _trigrams(n: int, g: torch.Generator, split: str) -> TaskBatch:
    table = trigram_table()
    tokens = _randint(0, TRI_VOCAB, (n, TRI_LEN), g)
    planted = torch.zeros(n, TRI_LEN, dtype=torch.bool)  # planted[b, p]: a trigram starts at p
    free_from = torch.zeros(n, dtype=torch.long)
    for p in range(TRI_LEN - 2):
        start = (torch.rand(n, generator=g) < TRI_RATE) & (free_from <= p)
        which = _randint(0, TRI_COUNT, (n,), g)
        tokens[:, p : p + 3] = torch.where(start[:, None], table[which], tokens[:, p : p + 3])
        planted[:, p] = start
        free_from = torch.where(start, p + 3, free_from)
    scored = torch.ones(n, TRI_LEN, dtype=torch.bool)
    scored[:, -1] = False
    judged = torch.zeros_like(scored)
    judged[:, 1:] = planted[:, :-1]  # at b, the model can predict c
    pair = tokens[:, :-1] * TRI_VOCAB + tokens[:, 1:]
    variable = torch.zeros_like(tokens)
    variable[:, 1:] = torch.isin(pair, table[:, 0] * TRI_VOCAB + table[:, 1]).long()
    var_mask = _positions(n, TRI_LEN, range(1, TRI_LEN))
    return TaskBatch(tokens, _next_token_labels(tokens, scored), scored, judged, variable, var_mask)


TRIGRAMS = Task(
    name="trigrams",
    summary="next token of random sequences with planted trigrams (5 %)",
    algorithm=(
        f"50 uniform tokens from a vocabulary of 75, where at each position a trigram (a, b, c) from a fixed set of "
        f"{TRI_COUNT} starts with probability 5 %. Only a trigram's last token is predictable: after a then b the "
        "model must predict c, so attention copies the previous token into the current position and the MLP looks "
        "up the (previous, current) pair. Accuracy counts planted completions only; elsewhere the best loss is "
        "log 75."
    ),
    vocab=tuple(str(v) for v in range(TRI_VOCAB)),
    outputs=tuple(str(v) for v in range(TRI_VOCAB)),
    n_ctx=TRI_LEN,
    architecture=ZooArchitecture(n_layers=1, n_heads=1, d_model=32, d_mlp=20, normalization=None),
    recipe=Recipe(steps=1200, batch_size=128, lr=3e-3),
    probe=ProbeVariable("trigram_prefix", "the previous and current token open a planted trigram", ("no", "yes")),
    generate=_trigrams,
)

TASKS: dict[str, Task] = {
    task.name: task for task in (PALINDROMES, UNIQUE_CHAR, SUM, SORTED_LIST, CUMSUM, CAESAR, TRIGRAMS)
}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise SaelabError(f"unknown zoo task '{name}'; choose one of {', '.join(TASKS)}")
    return TASKS[name]
