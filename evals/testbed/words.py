"""The testbed's English vocabulary, shared by its task generators (tasks.py) and the priors world's captions
(priors.py)."""

# CHAIR-style vocabulary: canonical object -> surface forms (singular; plurals are matched too).
CHAIR_SYNONYMS = {
    "circle": ["circle", "disc", "disk"],
    "square": ["square", "block"],
    "triangle": ["triangle"],
    "star": ["star"],
    "heart": ["heart"],
    "cross": ["cross", "plus sign"],
    "diamond": ["diamond", "rhombus", "lozenge"],
    "hexagon": ["hexagon"],
    "ring": ["ring", "donut", "doughnut"],
    "arrow": ["arrow"],
    "crescent": ["crescent", "moon", "crescent moon"],
    "pentagon": ["pentagon"],
}
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
STYLE_WORDS = {"plain": "plain", "gradient": "shaded", "noisy": "grainy", "striped": "striped"}


def plural(word: str) -> str:
    if word.endswith(("s", "x", "sh", "ch")):
        return word + "es"
    return word + "s"


def article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def where_phrase(position: str) -> str:
    """'top left' -> 'in the top left', 'top' -> 'at the top', 'left' -> 'on the left', 'center' -> 'in the center'."""
    if position in ("top", "bottom"):
        return f"at the {position}"
    if position in ("left", "right"):
        return f"on the {position}"
    return f"in the {position}"
