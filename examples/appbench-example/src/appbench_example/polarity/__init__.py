"""Task ``polarity``: a polarity word then three nouns; answer " yes" after "good", " no" after
"bad". The corruption flips the polarity word, so clean and corrupted prompts align token for
token and the answers swap. The spec lives in task.yaml and the reference circuits in
reference/, both package data of this folder."""

import itertools
import random

from appbench import PromptPair, Task, TaskError


class PolarityTask(Task):
    package = "appbench_example.polarity"
    NOUNS = ("movie", "film", "show", "play")

    def vocabulary(self):
        return ["good", "bad", *self.NOUNS, "yes", "no"]

    def generate(self, tokenizer, n, seed):
        tails = [" ".join(t) for t in itertools.product(self.NOUNS, repeat=3)]
        clean = [(word, tail) for tail in tails for word in ("good", "bad")]
        if n > len(clean):
            raise TaskError(f"the polarity task has only {len(clean)} distinct prompts, {n} asked")
        random.Random(seed).shuffle(clean)
        pairs = []
        for word, tail in clean[:n]:
            other = "bad" if word == "good" else "good"
            answer, wrong = (" yes", " no") if word == "good" else (" no", " yes")
            pairs.append(PromptPair(f"{word} {tail}", f"{other} {tail}", (answer,), (wrong,), word))
        return pairs
