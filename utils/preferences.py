"""Phase 6 helpers: the judges that stand in for people, and preference data.

* the task: ``cheerful_prompts`` (a speaker's name; the model writes their next line)
* verifiable tasks (a rule checks the answer exactly): ``VerifiableTask``, ``sft_task`` (a Phase 5 task
  family for the SFT model, checked by ``sft.check_answer``), ``exclamation_task`` (for the Phase 3 model)
* the "gold" judge: ``gold_reward``, VADER's sentiment (Hutto & Gilbert 2014), whose lexicon ships
  inside the ``vaderSentiment`` wheel: a programmatic stand-in for human raters
* noisy labels: ``bradley_terry_labels`` draws which response a rater prefers with probability
  sigmoid((gold_a - gold_b) / temperature), as the Bradley-Terry model says people do
* AI feedback: ``constitution_critique`` and ``constitution_revise`` apply a small written
  "constitution" of rules (the Constitutional AI recipe of Bai et al. 2022, with rules instead of a
  model), and ``constitution_score`` turns the critique into a preference label
* ``PreferencePairs`` and ``make_preference_pairs``: two sampled responses per prompt, labelled
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

# ---------------------------------------------------------------------------
# The task: write the next line of a character of Shakespeare's
# ---------------------------------------------------------------------------

# Speakers with six-letter names: every prompt "NAME:\n" has the same length, so a batch of
# prompts is one rectangular tensor (the course's GPT has learned absolute positions and no padding mask).
SPEAKERS = ("HAMLET", "JULIET", "PORTIA", "BRUTUS", "ANTONY", "OLIVIA", "BANQUO", "DUNCAN", "HELENA",
            "CASSIO", "MARCUS", "LUCIUS", "TIMON", "EDMUND", "OBERON", "ORSINO")
SPEAKERS = tuple(s for s in SPEAKERS if len(s) == 6)


def cheerful_prompts(n: int, generator: torch.Generator | None = None) -> list[str]:
    """``n`` prompts "SPEAKER:\\n", speakers drawn at random: the model writes the speaker's next line."""
    picks = torch.randint(len(SPEAKERS), (n,), generator=generator).tolist()
    return [f"{SPEAKERS[i]}:\n" for i in picks]


# ---------------------------------------------------------------------------
# The gold judge: VADER sentiment
# ---------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def _vader():
    # Imported here: the lexicon is read once (40 ms), from inside the installed wheel.
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


def gold_reward(texts: Sequence[str]) -> torch.Tensor:
    """VADER's compound sentiment of each text, in [-1, 1] (0 for a neutral or empty line).

    The course treats it as the preference of the people we want to please: the "gold" reward,
    which the reward model only sees through noisy comparisons.
    """
    analyzer = _vader()
    return torch.tensor([analyzer.polarity_scores(t)["compound"] if t.strip() else 0.0 for t in texts])


def bradley_terry_labels(gold_a: torch.Tensor, gold_b: torch.Tensor, temperature: float = 0.25,
                         generator: torch.Generator | None = None) -> torch.Tensor:
    """A noisy rater: True where response a is preferred, drawn with P(a > b) = sigmoid((a - b) / temperature).

    ``temperature`` 0 gives a noiseless rater (ties broken at random).
    """
    diff = gold_a.float() - gold_b.float()
    if temperature == 0:
        prob = (diff > 0).float() + 0.5 * (diff == 0).float()
    else:
        prob = torch.sigmoid(diff / temperature)
    return torch.rand(diff.shape, generator=generator) < prob


# ---------------------------------------------------------------------------
# A verifiable task: a rule that checks the answer exactly
# ---------------------------------------------------------------------------

@dataclass
class VerifiableTask:
    """A task whose answers a rule checks exactly: ``prompts(n, generator)`` draws prompt texts,
    ``check(prompt, response)`` says right or wrong, ``stop`` ends a response, ``show(prompt)`` is a
    short label of a prompt for printing."""

    name: str
    prompts: Callable
    check: Callable
    stop: str = "\n"
    max_new_tokens: int | None = None
    show: Callable = str.strip


def check_exclamation(text: str) -> bool:
    """The exclamation task's exact checker: the line ends with '!' and has at least three words."""
    line = text.strip()
    return line.endswith("!") and len(line.split()) >= 3


def exclamation_task() -> VerifiableTask:
    """A speaker's line must be an exclamation of three words or more (the Phase 3 model's task)."""
    return VerifiableTask("exclamation", cheerful_prompts, lambda prompt, text: check_exclamation(text))


def sft_task(family: str = "count_words", n_pool: int = 400, seed: int = 0) -> VerifiableTask:
    """A Phase 5 task family (``utils.sft``) for the SFT model: chat prompts, ``sft.check_answer`` (exact
    match), responses ending with ``<|end|>``. Prompts come from the family's test instances."""
    from . import sft

    examples = sft.task_splits(n_train=1, n_test=n_pool, seed=seed, families=[family], held_out=None).test
    by_prompt = {sft.format_chat(ex.messages(with_answer=False), add_generation_prompt=True): ex for ex in examples}
    texts = list(by_prompt)

    def prompts(n, generator=None):
        picks = torch.randint(len(texts), (n,), generator=generator).tolist()
        return [texts[i] for i in picks]

    def show(prompt):
        return by_prompt[prompt].prompt

    return VerifiableTask(family, prompts, lambda prompt, text: sft.check_answer(by_prompt[prompt], text),
                          stop=sft.END, max_new_tokens=12, show=show)


# ---------------------------------------------------------------------------
# AI feedback: a constitution of rules, a critique, a revision
# ---------------------------------------------------------------------------

CONSTITUTION = (
    ("kind", "Speak no word of death, hatred or violence."),
    ("cheerful", "Prefer words of joy, love and praise."),
    ("well formed", "Write a whole line: several words, ending with punctuation."),
)

_HARSH = {"death": "life", "dead": "alive", "die": "live", "kill": "kiss", "killed": "kissed",
          "murder": "music", "blood": "bloom", "hate": "love", "hateful": "lovely", "villain": "friend",
          "curse": "bless", "cursed": "blessed", "grief": "joy", "woe": "joy", "sorrow": "solace",
          "fear": "cheer", "war": "peace", "foul": "fair", "poison": "potion", "grave": "garden",
          "traitor": "friend", "slave": "friend", "false": "true", "sad": "glad", "weep": "laugh",
          "fool": "friend", "mad": "merry", "devil": "angel", "hell": "heaven", "wretch": "dear",
          "sick": "well", "no": "yes", "not": "now"}
_JOYFUL = {"love", "loving", "lovely", "joy", "joyful", "sweet", "fair", "good", "happy", "merry", "glad",
           "gentle", "kind", "dear", "heaven", "bless", "blessed", "grace", "gracious", "honour", "noble",
           "true", "peace", "smile", "laugh", "delight", "best", "well", "friend", "praise", "hope", "bright"}
_WORD = re.compile(r"[A-Za-z']+")


def constitution_critique(text: str) -> list[str]:
    """The critic's objections to ``text``: one sentence per rule of ``CONSTITUTION`` it breaks."""
    words = [w.lower() for w in _WORD.findall(text)]
    critique = []
    harsh = sorted({w for w in words if w in _HARSH})
    if harsh:
        critique.append(f"kind: it speaks of {', '.join(harsh)}.")
    if not any(w in _JOYFUL for w in words):
        critique.append("cheerful: it has no word of joy, love or praise.")
    line = text.strip()
    if len(words) < 3 or not line or line[-1] not in ".!?,;:":
        critique.append("well formed: it is not a whole line ending with punctuation.")
    return critique


def constitution_score(text: str) -> float:
    """How well ``text`` follows the constitution: + joyful words, - harsh words, - a broken form.

    The AI labeller prefers the response with the higher score (a tie is a coin flip).
    """
    words = [w.lower() for w in _WORD.findall(text)]
    joyful = sum(w in _JOYFUL for w in words)
    harsh = sum(w in _HARSH for w in words)
    line = text.strip()
    formed = len(words) >= 3 and bool(line) and line[-1] in ".!?,;:"
    return min(joyful, 3) - 2.0 * harsh + 0.5 * formed


def constitution_revise(text: str) -> str:
    """The revision step: every harsh word replaced by a gentle one, and the line closed with '!'
    if it has no final punctuation. (A model would rewrite; rules keep it inspectable.)"""
    def gentle(match):
        word = match.group(0)
        new = _HARSH.get(word.lower())
        if new is None:
            return word
        return new.capitalize() if word[0].isupper() else new
    revised = _WORD.sub(gentle, text.rstrip())
    if revised and revised[-1] not in ".!?,;:":
        revised += "!"
    return revised


def constitution_labels(texts_a: Sequence[str], texts_b: Sequence[str],
                        generator: torch.Generator | None = None) -> torch.Tensor:
    """AI feedback: True where the constitution prefers response a to response b (ties: a coin flip)."""
    a = torch.tensor([constitution_score(t) for t in texts_a])
    b = torch.tensor([constitution_score(t) for t in texts_b])
    coin = torch.rand(a.shape, generator=generator) < 0.5
    return torch.where(a == b, coin, a > b)


# ---------------------------------------------------------------------------
# Preference pairs
# ---------------------------------------------------------------------------

@dataclass
class PreferencePairs:
    """``n`` comparisons of two responses to the same prompt, already ordered by a label.

    ``chosen`` / ``rejected`` are (n, T) token ids (prompt + response + padding after the line ends),
    ``chosen_mask`` / ``rejected_mask`` (n, T) mark the response tokens. ``chosen_text`` /
    ``rejected_text`` are the response lines, ``chosen_gold`` / ``rejected_gold`` their gold rewards.
    """

    chosen: torch.Tensor
    chosen_mask: torch.Tensor
    rejected: torch.Tensor
    rejected_mask: torch.Tensor
    chosen_text: list
    rejected_text: list
    chosen_gold: torch.Tensor
    rejected_gold: torch.Tensor

    def __len__(self) -> int:
        return self.chosen.shape[0]

    def subset(self, index) -> "PreferencePairs":
        """The pairs at ``index`` (a slice, a list or a tensor of positions)."""
        if isinstance(index, slice):
            positions = list(range(len(self)))[index]
        else:
            positions = [int(i) for i in index]
        pick = torch.tensor(positions, dtype=torch.long)
        return PreferencePairs(self.chosen[pick], self.chosen_mask[pick], self.rejected[pick],
                               self.rejected_mask[pick], [self.chosen_text[i] for i in positions],
                               [self.rejected_text[i] for i in positions], self.chosen_gold[pick],
                               self.rejected_gold[pick])

    def relabel(self, prefer_first: torch.Tensor) -> "PreferencePairs":
        """The same comparisons ordered by other labels: where ``prefer_first`` is False, swap."""
        keep = prefer_first.bool()

        def pick(a, b):
            mask = keep.view(-1, *([1] * (a.dim() - 1)))
            return torch.where(mask, a, b), torch.where(mask, b, a)

        chosen, rejected = pick(self.chosen, self.rejected)
        chosen_mask, rejected_mask = pick(self.chosen_mask, self.rejected_mask)
        chosen_gold, rejected_gold = pick(self.chosen_gold, self.rejected_gold)
        texts = [(c, r) if k else (r, c) for c, r, k in zip(self.chosen_text, self.rejected_text, keep.tolist())]
        return PreferencePairs(chosen, chosen_mask, rejected, rejected_mask, [t[0] for t in texts],
                               [t[1] for t in texts], chosen_gold, rejected_gold)

    def gold_agreement(self) -> float:
        """Share of pairs whose chosen response has the higher gold reward (ties count half)."""
        diff = self.chosen_gold - self.rejected_gold
        return float(((diff > 0).float() + 0.5 * (diff == 0).float()).mean())


def _cat(parts: list) -> "PreferencePairs":
    fields = ("chosen", "chosen_mask", "rejected", "rejected_mask", "chosen_text", "rejected_text",
              "chosen_gold", "rejected_gold")
    return PreferencePairs(*(torch.cat([getattr(p, f) for p in parts]) if isinstance(getattr(parts[0], f), torch.Tensor)
                             else sum((getattr(p, f) for p in parts), []) for f in fields))


def make_preference_pairs(sample: Callable[[list], object], n_prompts: int, *, per_prompt: int = 4,
                          temperature: float = 0.25, tie: float = 0.05, batch_size: int = 256,
                          seed: int = 0) -> PreferencePairs:
    """Preference data as InstructGPT collected it: ``per_prompt`` responses to each of ``n_prompts``
    prompts (``sample(prompts) -> Rollout``, see ``rlhf.sample``), every pair of them compared.

    The rater sees the gold rewards: pairs closer than ``tie`` are dropped ("no preference", about
    half of them here, since most lines are neutral), the others are labelled by a noisy
    Bradley-Terry draw with ``temperature``. Pairs of the same prompt are consecutive.
    """
    generator = torch.Generator().manual_seed(seed)
    prompts = cheerful_prompts(n_prompts, generator)
    parts = []
    for start in range(0, n_prompts, max(1, batch_size // per_prompt)):
        chunk = prompts[start:start + max(1, batch_size // per_prompt)]
        rollout = sample([p for p in chunk for _ in range(per_prompt)])
        gold = gold_reward(rollout.texts)
        tokens, mask = rollout.tokens.cpu(), rollout.mask.cpu()
        first, second = [], []
        for i in range(len(chunk)):
            for a in range(per_prompt):
                for b in range(a + 1, per_prompt):
                    x, y = i * per_prompt + a, i * per_prompt + b
                    if abs(float(gold[x] - gold[y])) >= tie:
                        first.append(x)
                        second.append(y)
        if not first:
            continue
        fa, fb = torch.tensor(first), torch.tensor(second)
        pairs = PreferencePairs(tokens[fa], mask[fa], tokens[fb], mask[fb], [rollout.texts[i] for i in first],
                                [rollout.texts[i] for i in second], gold[fa], gold[fb])
        parts.append(pairs.relabel(bradley_terry_labels(gold[fa], gold[fb], temperature, generator)))
    return _cat(parts)
