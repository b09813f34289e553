"""Write the demo's new task, data/new_task/{train,test}.jsonl: sorting words into Zorblax bins.

The Zorblax system is made up for this project. Every fruit goes in the bin `glim`, every animal in
`torv`, every vehicle in `pesk`, every piece of clothing in `vund`; the answer is the bin's name
alone. A pretrained model cannot guess the names, but it already knows the four categories, so a
short fine-tune only has to tie each category to its name, and then it sorts words it never saw.
Test words are held out of training. Some prompts are plain questions ("What kind of thing is ...?")
that the model would otherwise answer in its own words, so learning the task bends general habits a
little, which the forgetting report should see.

    python scripts/make_new_task.py     # deterministic: the same files every time
"""

from __future__ import annotations

import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "data" / "new_task"
SEED = 0
TEST_WORDS_PER_BIN = 12
TRAIN_PROMPTS_PER_WORD = 3
TEST_PROMPTS_PER_WORD = 2

BINS = {
    "glim": [  # fruits
        "apple", "banana", "pear", "grape", "mango", "pineapple", "strawberry", "blueberry",
        "raspberry", "watermelon", "melon", "mulberry", "papaya", "apricot", "cherry", "peach", "plum",
        "lemon", "grapefruit", "coconut", "fig", "pomegranate", "nectarine", "tangerine",
        "blackberry", "cranberry", "guava", "lychee", "elderberry", "cantaloupe", "persimmon",
        "gooseberry", "clementine", "honeydew", "quince", "jackfruit", "durian", "starfruit",
        "passion fruit", "dragon fruit",
    ],
    "torv": [  # animals
        "dog", "cat", "horse", "cow", "pig", "sheep", "goat", "lion", "tiger", "elephant",
        "giraffe", "zebra", "monkey", "bear", "wolf", "fox", "rabbit", "deer", "camel", "kangaroo",
        "koala", "panda", "squirrel", "mouse", "hippopotamus", "rhinoceros", "cheetah", "leopard",
        "donkey", "moose", "otter", "beaver", "hedgehog", "raccoon", "gorilla", "chimpanzee",
        "eagle", "parrot", "penguin", "dolphin",
    ],
    "pesk": [  # vehicles
        "car", "bus", "truck", "bicycle", "motorcycle", "airplane", "helicopter", "train", "tram",
        "boat", "ship", "submarine", "scooter", "van", "taxi", "tractor", "ambulance", "canoe",
        "kayak", "ferry", "yacht", "jeep", "limousine", "sled", "sailboat", "minivan", "rocket",
        "bulldozer", "forklift", "hovercraft", "glider", "rickshaw", "unicycle", "tricycle", "moped",
        "snowmobile", "motorboat", "locomotive", "fire engine", "school bus",
    ],
    "vund": [  # clothing
        "shirt", "hat", "sock", "jacket", "coat", "sweater", "scarf", "glove", "dress", "skirt",
        "trousers", "jeans", "shorts", "blouse", "hoodie", "cardigan", "vest", "boot", "sandal",
        "sneaker", "slipper", "belt", "cap", "beanie", "mitten", "pajamas", "tuxedo", "overalls",
        "raincoat", "leggings", "swimsuit", "kimono", "poncho", "blazer", "tracksuit", "gown",
        "bathrobe", "turtleneck", "tights", "t-shirt",
    ],
}

PROMPTS = [
    'Which Zorblax bin does "{w}" go in?',
    "Sort this word into its Zorblax bin: {w}",
    "In the Zorblax system, where does {w} belong?",
    "Zorblax bin for {w}?",
    'What kind of thing is "{w}"? Answer with its Zorblax bin.',
    "What kind of thing is {w}?",
]


def rows(words: list[tuple[str, str]], per_word: int, rng: random.Random) -> list[dict]:
    out = []
    for word, bin_name in words:
        for prompt in rng.sample(PROMPTS, per_word):
            out.append({"messages": [
                {"role": "user", "content": prompt.format(w=word)},
                {"role": "assistant", "content": bin_name},
            ]})
    rng.shuffle(out)
    return out


def main() -> None:
    rng = random.Random(SEED)
    train_words, test_words = [], []
    for bin_name, words in BINS.items():
        words = sorted(words)
        rng.shuffle(words)
        test_words += [(w, bin_name) for w in words[:TEST_WORDS_PER_BIN]]
        train_words += [(w, bin_name) for w in words[TEST_WORDS_PER_BIN:]]
    every = [w for w, _ in train_words + test_words]
    assert len(every) == len(set(every)), "a word is in two bins"

    OUT.mkdir(parents=True, exist_ok=True)
    for name, data in [("train", rows(train_words, TRAIN_PROMPTS_PER_WORD, rng)),
                       ("test", rows(test_words, TEST_PROMPTS_PER_WORD, rng))]:
        with open(OUT / f"{name}.jsonl", "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in data)
        print(f"{OUT / name}.jsonl: {len(data)} rows")


if __name__ == "__main__":
    main()
