"""Distillation data from the teacher itself: chat prompts made from topics x instructions, each
answered by the teacher (sampled), so the student learns the teacher's own distribution on the
kind of text it will serve (sequence-level knowledge distillation; build time only: torch).

Prompts are deterministic for a seed. None is a question of the committed task set
(``models/data/tasks.jsonl``): those are held out for evaluation.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

TOPICS = (
    "photosynthesis", "the water cycle", "volcanoes", "earthquakes", "black holes", "the Moon",
    "the Sun", "Mars", "gravity", "magnetism", "electricity", "batteries", "solar panels",
    "wind turbines", "nuclear power", "climate change", "the ocean", "coral reefs", "rainforests",
    "deserts", "glaciers", "clouds", "rainbows", "thunderstorms", "hurricanes", "bees", "ants",
    "whales", "dolphins", "elephants", "cats", "dogs", "horses", "birds' migration",
    "dinosaurs", "evolution", "DNA", "vaccines", "the immune system", "the heart", "the brain",
    "sleep", "nutrition", "vitamins", "exercise", "meditation", "stress", "friendship",
    "teamwork", "leadership", "time management", "public speaking", "job interviews",
    "writing a CV", "saving money", "budgeting", "inflation", "interest rates", "taxes",
    "the stock market", "small businesses", "marketing", "negotiation", "customer service",
    "the Roman Empire", "ancient Egypt", "ancient Greece", "the Renaissance",
    "the Industrial Revolution", "the printing press", "the internet", "smartphones",
    "social media", "video games", "artificial intelligence", "machine learning",
    "robots", "self-driving cars", "electric cars", "trains", "airplanes", "bicycles",
    "space exploration", "satellites", "telescopes", "microscopes", "chemistry",
    "the periodic table", "acids and bases", "atoms", "light", "sound", "music theory",
    "the piano", "the guitar", "jazz", "classical music", "painting", "photography",
    "architecture", "bridges", "cities", "gardening", "composting", "recycling", "cooking pasta",
    "baking bread", "making coffee", "tea", "chocolate", "healthy breakfasts", "vegetarian food",
    "spices", "fermentation", "learning a language", "reading habits", "poetry", "novels",
    "fairy tales", "mythology", "philosophy", "ethics", "logic", "prime numbers", "fractions",
    "percentages", "geometry", "probability", "statistics", "algebra", "calculus",
    "Python programming", "variables in programming", "loops in programming",
    "functions in programming", "recursion", "sorting algorithms", "databases", "SQL",
    "HTML", "CSS", "JavaScript", "Git", "Linux", "the command line", "cybersecurity",
    "passwords", "encryption", "email etiquette", "remote work", "note taking",
    "studying for exams", "memory techniques", "creativity", "curiosity", "happiness",
    "kindness", "travel", "camping", "hiking", "swimming", "running", "football", "chess",
    "board games", "puzzles", "weather forecasts", "maps", "mountains", "rivers", "islands",
    "forests", "the seasons", "winter", "summer", "holidays", "birthdays", "weddings",
)

INSTRUCTIONS = (
    "What is {t}?",
    "Explain {t} in simple terms.",
    "Explain {t} to a ten-year-old.",
    "Give me three interesting facts about {t}.",
    "Why is {t} important?",
    "Write a short paragraph about {t}.",
    "Write a haiku about {t}.",
    "Write a short poem about {t}.",
    "What are the pros and cons of {t}?",
    "Summarize the key ideas of {t} in two sentences.",
    "How would you teach someone about {t}?",
    "List five words related to {t}.",
    "Write a tweet about {t}.",
    "What is a common misconception about {t}?",
    "Tell me a short story involving {t}.",
    "What questions should a beginner ask about {t}?",
    "Compare {t} with something from everyday life.",
    "Give one practical tip about {t}.",
    "What is the history of {t}?",
    "Describe {t} in one sentence.",
    "Write a title for an article about {t}.",
    "How does {t} affect people's daily lives?",
)


def make_prompts(count: int, seed: int, exclude: Sequence[str] = ()) -> list[str]:
    """``count`` instructions (topic x template, shuffled with ``seed``; repeats only once all
    combinations are used), none equal to an ``exclude``d question."""
    banned = {e.strip().lower() for e in exclude}
    combos = [i.format(t=t) for t in TOPICS for i in INSTRUCTIONS]
    combos = [c for c in combos if c.strip().lower() not in banned]
    rng = random.Random(seed)
    out: list[str] = []
    while len(out) < count:
        batch = combos[:]
        rng.shuffle(batch)
        out.extend(batch[: count - len(out)])
    return out


def generate_sequences(model: Any, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int,
                       batch_size: int, temperature: float, top_p: float, seed: int,
                       eos_id: int, device: str) -> list[list[int]]:
    """Render each prompt with the tokenizer's chat template and sample the teacher's answer;
    return prompt + answer token ids (the answer ends with ``eos_id`` when it finished)."""
    import torch

    torch.manual_seed(seed)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token_id = eos_id
    pad = tokenizer.pad_token_id
    out: list[list[int]] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        rendered = [tokenizer.apply_chat_template([{"role": "user", "content": p}],
                                                  add_generation_prompt=True, tokenize=False)
                    for p in chunk]
        enc = tokenizer(rendered, return_tensors="pt", padding=True, add_special_tokens=False)
        enc = {k: v.to(device) for k, v in enc.items()}
        with torch.no_grad():
            gen = model.generate(**enc, do_sample=True, temperature=temperature, top_p=top_p,
                                 max_new_tokens=max_new_tokens, eos_token_id=eos_id,
                                 pad_token_id=pad)
        width = enc["input_ids"].shape[1]
        for row, mask in zip(gen.tolist(), enc["attention_mask"].tolist(), strict=True):
            prompt_ids = [t for t, m in zip(row[:width], mask, strict=True) if m]
            answer = row[width:]
            if eos_id in answer:
                answer = answer[: answer.index(eos_id) + 1]
            out.append(prompt_ids + answer)
    return out
