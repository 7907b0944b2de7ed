"""Varied prompts for the base model's self-generated training text: openings of the training
paragraphs, prose openings, "User: ... / Assistant:" requests and the same requests through the
GGUF's chat template. Requests are built from templates x topics with a seeded RNG. The held-out evaluation
prompts (tests/data/mtp_heldout_prompts.txt) are hand-written elsewhere and never built from these.
"""

from __future__ import annotations

import random

from llmkit.core.tokenizer.chat import chat_template, render_chat

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
    "Tell me about {t}.",
    "Why is {t} important?",
    "Can you explain how {t} works?",
    "Write a blog post introduction about {t}.",
    "What should a student know about {t}?",
    "Compare {t} with something from everyday life.",
    "Write a few questions and answers about {t}.",
    "Describe {t} in simple words.",
    "Write a poem about {t}.",
    "What is the future of {t}?",
    "Give me some tips related to {t}.",
    "Write a diary entry about a day spent learning about {t}.",
)
# openings of prose the model continues (no chat framing): stories, reports, essays
OPENINGS = (
    "Once upon a time, in a village near {t},",
    "The first thing you notice about {t} is",
    "Many people have never thought about {t}, but",
    "Chapter 1\n\nNobody in the small town expected {t} to",
    "In this article, we will look at {t} and",
    "When my grandmother told me about {t}, I",
    "Scientists have studied {t} for many years.",
    "Here is a simple guide to {t}.",
    "It was a quiet morning when the news about {t} arrived.",
    "The story of {t} begins",
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
    "photosynthesis",
    "the Great Wall of China",
    "saving money",
    "the Pacific Ocean",
    "robots",
    "friendship",
    "climate change",
    "the solar system",
    "ancient Egypt",
    "coffee",
    "basketball",
    "rain forests",
    "electricity",
    "penguins",
    "the piano",
    "video games",
    "kindness",
    "bridges",
    "volunteering",
    "smartphones",
    "the Renaissance",
    "yoga",
    "deserts",
    "airplanes",
    "mathematics",
    "a job interview",
    "the ocean floor",
    "composting",
    "elephants",
    "the Roman alphabet",
    "running a marathon",
    "a small bakery",
    "space travel",
    "the moon",
    "artificial intelligence",
    "first aid",
    "pirates",
    "a haunted house",
    "a lost dog",
    "the city at night",
    "camping in the mountains",
    "a birthday party",
    "a new school",
    "the summer holidays",
    "an old lighthouse keeper",
    "a talking cat",
    "a secret garden",
    "a long train journey",
    "writing a resume",
    "cooking pasta",
    "drinking enough water",
    "the history of writing",
    "magnets",
    "sharks",
    "the Arctic",
    "dragons",
    "a robot who wants to paint",
    "time management",
    "social media",
    "the Amazon river",
)


def make_prompts(lm, tok, paras: list[str], n: int, rng: random.Random) -> list[list[int]]:
    """n prompts as token ids (BOS first where the model adds one)."""
    template, _ = chat_template(lm.metadata, lm.arch)
    out = []
    for _ in range(n):
        kind = rng.random()
        topic = rng.choice(TOPICS)
        request = rng.choice(TEMPLATES).format(t=topic)
        if paras and kind < 0.15:  # an opening of a training paragraph
            words = rng.choice(paras).split()
            text = " ".join(words[: rng.randint(8, 40)])
            out.append(tok.encode(text, add_special=True, parse_special=False))
        elif kind < 0.35:
            text = rng.choice(OPENINGS).format(t=topic)
            out.append(tok.encode(text, add_special=True, parse_special=False))
        elif kind < 0.6:
            text = f"User: {request}\nAssistant:"
            out.append(tok.encode(text, add_special=True, parse_special=False))
        else:
            text = render_chat(template, [{"role": "user", "content": request}])
            out.append(tok.encode(text, add_special=True, parse_special=True))
    return out
