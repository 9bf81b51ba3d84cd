"""Write probes/data/tasks/arithmetic.jsonl: 40 seeded one-step sums, differences and products,
each with four numeric choices (the answer, near misses and the result of another operation)."""

import json
import random
from pathlib import Path

OPS = {"plus": lambda a, b: a + b, "minus": lambda a, b: a - b, "times": lambda a, b: a * b}


def items(n: int = 40, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out, seen = [], set()
    while len(out) < n:
        word = list(OPS)[len(out) % 3]
        a, b = (rng.randint(2, 12), rng.randint(2, 9)) if word == "times" else (rng.randint(10, 60), rng.randint(2, 30))
        if word == "minus" and b > a:
            a, b = b, a
        if (a, word, b) in seen:
            continue
        seen.add((a, word, b))
        answer = OPS[word](a, b)
        other = OPS["plus" if word != "plus" else "times"](a, b)
        choices = [answer]
        for c in (answer + 1, answer - 1, other, answer + 10, answer - 2):
            if c not in choices and c >= 0 and len(choices) < 4:
                choices.append(c)
        order = rng.sample(range(4), 4)
        out.append(
            {
                "question": f"What is {a} {word} {b}?",
                "choices": [str(choices[j]) for j in order],
                "answer": order.index(0),
            }
        )
    return out


if __name__ == "__main__":
    path = Path(__file__).resolve().parents[1] / "probes" / "data" / "tasks" / "arithmetic.jsonl"
    path.write_text("".join(json.dumps(item) + "\n" for item in items()))
    print(f"wrote {path}")
