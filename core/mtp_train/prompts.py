"""Varied prompts for the base model's self-generated training text: openings of the training
paragraphs, "User: ... / Assistant:" requests and the same requests through the GGUF's chat
template. Requests are built from templates x topics with a seeded RNG. The held-out evaluation
prompts (tests/data/mtp_heldout_prompts.txt) are hand-written elsewhere and never built from these.
"""

from __future__ import annotations

import random

from llmkit.core.chat import chat_template, render_chat

TEMPLATES = (
    "Explain {t} to a curious teenager.",
    "Write a short paragraph about {t}.",
    "What are the main ideas behind {t}?",
    "Give three interesting facts about {t}.",
    "Describe the history of {t} in a few sentences.",
    "Write a short story that involves {t}.",
    "How would you teach a beginner about {t}?",
    "List some pros and cons of {t}.",
    "Summarize what people usually get wrong about {t}.",
    "Write a friendly note to a friend about {t}.",
)
TOPICS = (
    "volcanoes",
    "the water cycle",
    "honey bees",
    "ancient Rome",
    "black holes",
    "recycling",
    "the human heart",
    "chess openings",
    "sourdough bread",
    "electric cars",
    "the Moon landing",
    "coral reefs",
    "Python lists",
    "binary numbers",
    "the French Revolution",
    "rainbows",
    "compound interest",
    "mountain climbing",
    "jazz music",
    "the immune system",
    "glaciers",
    "public libraries",
    "paper airplanes",
    "tea ceremonies",
    "migrating birds",
    "sorting algorithms",
    "the stock market",
    "solar panels",
    "dinosaurs",
    "learning a new language",
    "earthquakes",
    "the printing of money",
    "octopuses",
    "vaccines",
    "board games",
    "the Silk Road",
    "gardening",
    "time zones",
    "lighthouses",
    "spreadsheets",
    "meditation",
    "the Olympic Games",
    "submarines",
    "bicycles",
    "desert plants",
    "the internet",
    "comets",
    "origami",
    "weather forecasts",
    "healthy breakfasts",
    "castles",
    "hash tables",
    "wolves",
    "pottery",
    "trains",
    "tides",
)


def make_prompts(lm, tok, paras: list[str], n: int, rng: random.Random) -> list[list[int]]:
    """n prompts as token ids (BOS first where the model adds one)."""
    template, _ = chat_template(lm.metadata, lm.arch)
    out = []
    for _ in range(n):
        kind = rng.random()
        request = rng.choice(TEMPLATES).format(t=rng.choice(TOPICS))
        if paras and kind < 0.4:  # an opening of a training paragraph
            words = rng.choice(paras).split()
            text = " ".join(words[: rng.randint(8, 40)])
            out.append(tok.encode(text, add_special=True, parse_special=False))
        elif kind < 0.7:
            text = f"User: {request}\nAssistant:"
            out.append(tok.encode(text, add_special=True, parse_special=False))
        else:
            text = render_chat(template, [{"role": "user", "content": request}])
            out.append(tok.encode(text, add_special=True, parse_special=True))
    return out
