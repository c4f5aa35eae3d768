"""Reverse a word: a small text task with a checkable answer, as your own lit-sftrl environment."""

import gymnasium as gym

LETTERS = list("abcdefghijklmnopqrstuvwxyz")


class ReverseEnv(gym.Env):
    """The user asks for a random word reversed; a wrong answer gets one more try after feedback."""

    def __init__(self, min_letters: int = 3, max_letters: int = 5, attempts: int = 2):
        self.min_letters, self.max_letters, self.attempts = min_letters, max_letters, attempts

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        length = int(self.np_random.integers(self.min_letters, self.max_letters + 1))
        self.word, self.tries = "".join(self.np_random.choice(LETTERS, length)), 0
        self.messages = [{"role": "user", "content": f"Reverse the word '{self.word}'. Reply with that word only."}]
        return {"messages": [dict(m) for m in self.messages]}, {}

    def step(self, answer):
        self.tries += 1
        guess = answer.strip().strip("'\"").lower()
        correct = guess == self.word[::-1]
        done = correct or self.tries >= self.attempts
        if not done:  # the revision turn: the answer, then why it failed
            self.messages += [{"role": "assistant", "content": answer},
                              {"role": "user", "content": f"'{guess}' is not '{self.word}' reversed. Try again."}]
        info = {"success": correct, "correct": correct, "well_formed": guess.isalpha(),
                "budget_exhausted": done and not correct}
        return {"messages": [dict(m) for m in self.messages]}, float(correct), done, False, info

    def expert_answer(self):
        return self.word[::-1]
