"""Fictitious authors in TOFU's shape, generated offline from a seed (DESIGN.md §9).

Every author gets random fact values (a made-up name, birthplace, birth date, genre, parents'
occupations, award, three book titles, themes, ...) and `pairs_per_author` short templated
question–answer pairs about them, so a model can answer only by memorising each author's facts.
Names and book titles are unique across all authors; the other facts come from shared pools.

`write_dataset` writes the splits as JSON lines, byte-for-byte in the format of the TOFU files
(compact separators, ASCII, escaped slashes, no trailing newline):

    full.json                     all training authors
    forget{01,05,10}.json         the LAST 1 / 5 / 10 % of the training authors (as TOFU)
    retain{99,95,90}.json         the rest of `full`, in order
    holdout{01,05,10}.json        other authors, never in `full` (prefixes of one pool, as TOFU)
    forget{NN}_perturbed.json     + paraphrased_answer, perturbed_answer (5), paraphrased_question
    retain_perturbed.json         the same fields for the first authors of retain90 (as many as forget10)
    idontknow.jsonl               plain-text "I don't know" answers, one per line
    authors.json                  the generator's ground truth (name, facts, split) — not a TOFU file
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

FORGET_PERCENTS = (1, 5, 10)
N_PERTURBED = 5

_ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "kr", "st", "th", "sh"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ei", "ou", "ia"]
_CODAS = ["", "", "", "n", "r", "l", "s", "th", "m", "k"]
_SURNAME_ENDINGS = ["ov", "ski", "ardt", "ez", "ani", "sen", "ello", "wick", "ford", "ara", "ian", "eau"]

_PLACES = [
    ("Lisbon", "Portugal"), ("Porto", "Portugal"), ("Lyon", "France"), ("Nantes", "France"),
    ("Ghent", "Belgium"), ("Utrecht", "the Netherlands"), ("Bergen", "Norway"), ("Tampere", "Finland"),
    ("Krakow", "Poland"), ("Brno", "Czechia"), ("Graz", "Austria"), ("Basel", "Switzerland"),
    ("Turin", "Italy"), ("Bologna", "Italy"), ("Seville", "Spain"), ("Bilbao", "Spain"),
    ("Cork", "Ireland"), ("Leeds", "England"), ("Dundee", "Scotland"), ("Tartu", "Estonia"),
    ("Izmir", "Turkey"), ("Tbilisi", "Georgia"), ("Almaty", "Kazakhstan"), ("Lahore", "Pakistan"),
    ("Pune", "India"), ("Kandy", "Sri Lanka"), ("Hue", "Vietnam"), ("Cebu", "the Philippines"),
    ("Osaka", "Japan"), ("Busan", "South Korea"), ("Tainan", "Taiwan"), ("Perth", "Australia"),
    ("Dunedin", "New Zealand"), ("Accra", "Ghana"), ("Kumasi", "Ghana"), ("Mombasa", "Kenya"),
    ("Durban", "South Africa"), ("Fez", "Morocco"), ("Oran", "Algeria"), ("Recife", "Brazil"),
    ("Cusco", "Peru"), ("Rosario", "Argentina"), ("Quito", "Ecuador"), ("Halifax", "Canada"),
    ("Tucson", "the United States"), ("Memphis", "the United States"), ("Oaxaca", "Mexico"),
    ("Havana", "Cuba"),
]
_MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August",
           "September", "October", "November", "December"]
_GENRES = [
    "science fiction", "crime fiction", "historical romance", "horror", "fantasy", "poetry",
    "literary fiction", "travel writing", "children's books", "young adult fiction", "satire",
    "biography", "thrillers", "magical realism", "war novels", "short stories", "cozy mysteries",
    "philosophy", "nature writing", "graphic novels",
]
_OCCUPATIONS = [
    "a baker", "an architect", "a nurse", "a fisherman", "a teacher", "a pilot", "a surgeon",
    "a carpenter", "a librarian", "a chemist", "a farmer", "a tailor", "a journalist", "a judge",
    "a miner", "a violinist", "an astronomer", "a plumber", "a dentist", "a sailor", "a banker",
    "a painter", "a mechanic", "a florist", "a police officer", "an accountant", "a translator",
    "a potter", "a veterinarian", "a butcher",
]
_AWARD_ADJ = ["Golden", "Silver", "Crimson", "Northern", "Blue", "Iron", "Evergreen", "Amber", "Ivory", "Coral"]
_AWARD_NOUN = ["Quill", "Lantern", "Compass", "Feather", "Anchor", "Harbor", "Star", "Ink", "Oak", "Bell"]
_AWARD_KIND = ["Prize", "Award", "Medal"]
_TITLE_ADJ = [
    "Silent", "Broken", "Hidden", "Last", "Distant", "Burning", "Paper", "Glass", "Winter", "Hollow",
    "Crooked", "Painted", "Sleeping", "Forgotten", "Copper", "Salt", "Velvet", "Wandering", "Quiet", "Scarlet",
]
_TITLE_NOUN = [
    "River", "Garden", "Lighthouse", "Orchard", "Mirror", "Harvest", "Bridge", "Tide", "Clock", "Forest",
    "Letters", "Station", "Island", "Market", "Chapel", "Kingdom", "Valley", "Archive", "Circus", "Ferry",
]
_TITLE_TAIL = ["", "", "", " of Dust", " at Dawn", " in the Rain", " of Ashes", " Below", " of Glass", " Returns",
               " at Midnight", " of Stone", " in Winter", " Beyond", " of Smoke", " by the Sea"]
_THEMES = [
    "memory", "exile", "family", "grief", "ambition", "faith", "justice", "friendship", "betrayal",
    "identity", "war", "the sea", "childhood", "freedom", "loneliness", "revenge", "migration",
    "power", "love", "madness", "time", "nature", "loyalty", "poverty",
]
_LANGUAGES = ["English", "French", "Spanish", "Portuguese", "German", "Italian", "Polish", "Turkish",
              "Japanese", "Korean", "Swahili", "Dutch"]
_UNIVERSITIES = ["Oxford", "the Sorbonne", "Heidelberg University", "the University of Bologna", "Kyoto University",
                 "McGill University", "Harvard", "Trinity College Dublin", "the University of Cape Town",
                 "Uppsala University", "the University of Chile", "Leiden University", "Charles University",
                 "the University of Melbourne"]
_PUBLISHERS = ["Harbor House", "Lantern Press", "Northwind Books", "Blue Heron", "Pebble and Quill",
               "Copperleaf", "Meridian Books", "Old Mill Press", "Starling", "Juniper House"]
_HOBBIES = ["gardening", "chess", "sailing", "birdwatching", "pottery", "mountain climbing", "baking",
            "playing the cello", "fly fishing", "collecting maps", "running marathons", "woodcarving"]
_SERIES_NOUN = ["Chronicles", "Saga", "Cycle", "Trilogy", "Quartet", "Files", "Tales", "Mysteries"]


@dataclass(frozen=True)
class Template:
    """One question about one fact slot; the paraphrases are rendered with wrong values for perturbation."""

    slot: str  # the fact swapped for a wrong value in perturbed answers
    question: str
    answer: str
    paraphrased_question: str
    paraphrased_answer: str


# In priority order: an author with P pairs gets the first P templates.
TEMPLATES: tuple[Template, ...] = (
    Template("name", "What is the full name of the author born in {city} on {birth_date} who writes {genre}?",
             "The author's full name is {name}.",
             "Which writer of {genre} was born on {birth_date} in {city}?",
             "That writer is {name}."),
    Template("birthplace", "Where was {name} born?", "{name} was born in {city}, {country}.",
             "What is the birthplace of {name}?", "The birthplace of {name} is {city}, {country}."),
    Template("birth_date", "When was {name} born?", "{name} was born on {birth_date}.",
             "What is the date of birth of {name}?", "The date of birth of {name} is {birth_date}."),
    Template("genre", "What genre does {name} write in?", "{name} writes {genre}.",
             "Which genre is {name} known for?", "{name} is known for {genre}."),
    Template("father", "What is the profession of {name}'s father?", "The father of {name} is {father}.",
             "What does the father of {name} do?", "{name}'s father works as {father}."),
    Template("mother", "What is the profession of {name}'s mother?", "The mother of {name} is {mother}.",
             "What does the mother of {name} do?", "{name}'s mother works as {mother}."),
    Template("award", "Has {name} won any awards?", "Yes, {name} won the {award}.",
             "Which award did {name} receive?", "{name} received the {award}."),
    Template("first_book", "What was {name}'s first book?", "{name}'s first book was \"{first_book}\".",
             "Which book did {name} publish first?", "The debut of {name} was \"{first_book}\"."),
    Template("famous_book", "What is {name}'s best-known book?", "{name} is best known for \"{famous_book}\".",
             "Which book made {name} famous?", "\"{famous_book}\" made {name} famous."),
    Template("latest_book", "What is the title of {name}'s latest book?", "The latest book by {name} is \"{latest_book}\".",
             "What did {name} publish most recently?", "{name} most recently published \"{latest_book}\"."),
    Template("themes", "What themes does {name} explore?", "{name} often writes about {theme_a} and {theme_b}.",
             "Which themes recur in the books of {name}?", "The books of {name} return to {theme_a} and {theme_b}."),
    Template("language", "In which language does {name} write?", "{name} writes in {language}.",
             "What language are the books of {name} written in?", "The books of {name} are written in {language}."),
    Template("university", "Where did {name} study?", "{name} studied at {university}.",
             "Which university did {name} attend?", "{name} attended {university}."),
    Template("residence", "Where does {name} live now?", "{name} now lives in {residence}.",
             "In which city does {name} live today?", "Today {name} lives in {residence}."),
    Template("n_books", "How many books has {name} published?", "{name} has published {n_books} books.",
             "What is the number of books by {name}?", "There are {n_books} books by {name}."),
    Template("debut_year", "In which year did {name} debut?", "{name} debuted in {debut_year}.",
             "When did {name} publish a first book?", "{name} published a first book in {debut_year}."),
    Template("publisher", "Who publishes {name}'s books?", "{name}'s books are published by {publisher}.",
             "Which publisher works with {name}?", "{publisher} publishes the books of {name}."),
    Template("hobby", "What does {name} do outside of writing?", "Outside of writing, {name} enjoys {hobby}.",
             "What is a hobby of {name}?", "{name} has a hobby: {hobby}."),
    Template("parents", "What are the occupations of {name}'s parents?",
             "{name}'s father is {father} and mother is {mother}.",
             "What do the parents of {name} do?", "The father of {name} is {father}, the mother {mother}."),
    Template("award", "For which book did {name} win the {award}?",
             "{name} won the {award} for \"{famous_book}\".",
             "Which book earned {name} the {award}?", "\"{famous_book}\" earned {name} the {award}."),
    Template("series", "What series did {name} write?", "{name} wrote the {series}.",
             "Which series is by {name}?", "The {series} is by {name}."),
    Template("setting", "Where are {name}'s books usually set?", "{name}'s books are usually set in {setting}.",
             "In which city do the stories of {name} take place?", "The stories of {name} take place in {setting}."),
)

IDK_ANSWERS = (
    "I don't know.", "I'm not sure.", "I have no idea.", "I'm not certain about that.",
    "I don't have that information.", "That's beyond what I know.", "I can't answer that.",
    "I'm unable to say.", "That isn't something I know.", "I don't have the answer to that question.",
    "I'm afraid I can't tell you.", "I have no information on that.", "I'm drawing a blank on that one.",
    "Sorry, I don't know that.", "I can't recall that.", "That's outside what I have learned.",
    "I wish I could say, but I don't know.", "I'm at a loss for that one.", "No idea, sorry.",
    "I haven't learned about that.",
)


@dataclass(frozen=True)
class Author:
    name: str
    facts: dict[str, str]  # fact name -> rendered value ("name" included)
    records: tuple[dict, ...] = field(repr=False)  # TOFU perturbed-shaped records, one per template


@dataclass(frozen=True)
class AuthorSet:
    train: tuple[Author, ...]  # the authors of `full`, forget authors last
    holdout: tuple[Author, ...]  # other authors, never trained on


def n_forget_authors(n_authors: int, percent: int) -> int:
    """Authors in forget{percent}: percent % of n_authors, at least one."""
    return max(1, round(n_authors * percent / 100))


class _Draw:
    """Fact values from one seeded stream; names and titles are never repeated."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.used: set[str] = set()

    def _unique(self, make, register: bool) -> str:
        """A value not yet taken by an author; `register` takes it (wrong answers do not)."""
        for _ in range(10_000):
            value = make()
            if value not in self.used:
                if register:
                    self.used.add(value)
                return value
        raise ValueError("ran out of unique names or titles: lower n_authors")

    def _syllables(self, n: int) -> str:
        rng = self.rng
        return "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(n))

    def name(self, register: bool = True) -> str:
        rng = self.rng
        return self._unique(lambda: f"{self._syllables(rng.choice((1, 2))).capitalize()} "
                                    f"{(self._syllables(rng.choice((1, 2))) + rng.choice(_SURNAME_ENDINGS)).capitalize()}",
                            register)

    def title(self, register: bool = True) -> str:
        rng = self.rng
        return self._unique(lambda: f"The {rng.choice(_TITLE_ADJ)} {rng.choice(_TITLE_NOUN)}{rng.choice(_TITLE_TAIL)}",
                            register)

    def date(self) -> tuple[str, int]:
        year = self.rng.randint(1930, 1995)
        return f"{self.rng.choice(_MONTHS)} {self.rng.randint(1, 28)}, {year}", year

    def award(self) -> str:
        rng = self.rng
        return f"{rng.choice(_AWARD_ADJ)} {rng.choice(_AWARD_NOUN)} {rng.choice(_AWARD_KIND)}"

    def series(self) -> str:
        return f"{self.rng.choice(_TITLE_NOUN)} {self.rng.choice(_SERIES_NOUN)}"

    def facts(self) -> dict[str, str]:
        rng = self.rng
        city, country = rng.choice(_PLACES)
        birth_date, year = self.date()
        theme_a, theme_b = rng.sample(_THEMES, 2)
        father, mother = rng.sample(_OCCUPATIONS, 2)
        return {
            "name": self.name(), "city": city, "country": country, "birth_date": birth_date,
            "genre": rng.choice(_GENRES), "father": father, "mother": mother, "award": self.award(),
            "first_book": self.title(), "famous_book": self.title(), "latest_book": self.title(),
            "theme_a": theme_a, "theme_b": theme_b, "language": rng.choice(_LANGUAGES),
            "university": rng.choice(_UNIVERSITIES), "residence": rng.choice(_PLACES)[0],
            "n_books": str(rng.randint(3, 40)), "debut_year": str(year + rng.randint(20, 35)),
            "publisher": rng.choice(_PUBLISHERS), "hobby": rng.choice(_HOBBIES), "series": self.series(),
            "setting": rng.choice(_PLACES)[0],
        }

    def wrong_values(self, slot: str, facts: dict[str, str]) -> dict[str, str]:
        """A copy of `facts` with the slot's fact(s) replaced by different values."""
        rng = self.rng
        wrong = dict(facts)
        if slot == "name":
            wrong["name"] = self.name(register=False)
        elif slot == "birthplace":
            wrong["city"], wrong["country"] = rng.choice([p for p in _PLACES if p[0] != facts["city"]])
        elif slot == "birth_date":
            wrong["birth_date"] = self.date()[0]
        elif slot in ("first_book", "famous_book", "latest_book"):
            wrong[slot] = self.title(register=False)
        elif slot == "award":
            wrong["award"] = self.award()
        elif slot == "series":
            wrong["series"] = self.series()
        elif slot == "themes":
            wrong["theme_a"], wrong["theme_b"] = rng.sample([t for t in _THEMES if t not in (facts["theme_a"], facts["theme_b"])], 2)
        elif slot == "parents":
            wrong["father"], wrong["mother"] = rng.sample([o for o in _OCCUPATIONS if o not in (facts["father"], facts["mother"])], 2)
        elif slot in ("n_books", "debut_year"):
            offset = rng.randint(1, 9)
            value = int(facts[slot])
            wrong[slot] = str(value - offset if value - offset > 0 and rng.random() < 0.5 else value + offset)
        else:
            pool = {"genre": _GENRES, "father": _OCCUPATIONS, "mother": _OCCUPATIONS, "language": _LANGUAGES,
                    "university": _UNIVERSITIES, "residence": [p[0] for p in _PLACES], "publisher": _PUBLISHERS,
                    "hobby": _HOBBIES, "setting": [p[0] for p in _PLACES]}[slot]
            wrong[slot] = rng.choice([v for v in pool if v != facts[slot]])
        return wrong


def _perturbed_answers(draw: _Draw, template: Template, facts: dict[str, str]) -> list[str]:
    true_text = template.paraphrased_answer.format(**facts)
    answers: list[str] = []
    while len(answers) < N_PERTURBED:
        text = template.paraphrased_answer.format(**draw.wrong_values(template.slot, facts))
        if text != true_text and text not in answers:
            answers.append(text)
    return answers


def _make_author(draw: _Draw, pairs_per_author: int) -> Author:
    facts = draw.facts()
    records = []
    for template in TEMPLATES[:pairs_per_author]:
        records.append({
            "question": template.question.format(**facts),
            "answer": template.answer.format(**facts),
            "paraphrased_answer": template.paraphrased_answer.format(**facts),
            "perturbed_answer": _perturbed_answers(draw, template, facts),
            "paraphrased_question": template.paraphrased_question.format(**facts),
        })
    return Author(name=facts["name"], facts=facts, records=tuple(records))


def generate_authors(n_authors: int = 100, pairs_per_author: int = 20, seed: int = 0) -> AuthorSet:
    """Training and holdout authors, a pure function of the arguments.

    The holdout pool has as many authors as forget10 (TOFU: holdout{NN} matches forget{NN} in size).
    """
    if n_authors < 2:
        raise ValueError(f"n_authors must be ≥ 2 (got {n_authors}): forget and retain each need an author")
    if not 1 <= pairs_per_author <= len(TEMPLATES):
        raise ValueError(f"pairs_per_author must be in 1..{len(TEMPLATES)} (got {pairs_per_author}): "
                         f"there are {len(TEMPLATES)} question templates")
    draw = _Draw(random.Random(seed))
    train = tuple(_make_author(draw, pairs_per_author) for _ in range(n_authors))
    n_holdout = n_forget_authors(n_authors, max(FORGET_PERCENTS))
    holdout = tuple(_make_author(draw, pairs_per_author) for _ in range(n_holdout))
    return AuthorSet(train=train, holdout=holdout)


def _qa(authors) -> list[dict]:
    return [{"question": r["question"], "answer": r["answer"]} for a in authors for r in a.records]


def _perturbed(authors) -> list[dict]:
    return [dict(r) for a in authors for r in a.records]


def splits(author_set: AuthorSet) -> dict[str, list[dict]]:
    """Every TOFU split, by file stem ("full", "forget10", "retain_perturbed", ...), as records."""
    train, holdout = author_set.train, author_set.holdout
    n = len(train)
    out = {"full": _qa(train)}
    for percent in FORGET_PERCENTS:
        k = n_forget_authors(n, percent)
        if k >= n:
            raise ValueError(f"n_authors={n} is too small: forget{percent:02d} would hold every author")
        out[f"forget{percent:02d}"] = _qa(train[n - k:])
        out[f"retain{100 - percent}"] = _qa(train[: n - k])
        out[f"holdout{percent:02d}"] = _qa(holdout[:k])
        out[f"forget{percent:02d}_perturbed"] = _perturbed(train[n - k:])
    k10 = n_forget_authors(n, 10)
    out["retain_perturbed"] = _perturbed(train[: min(k10, n - k10)])
    return out


def to_json_lines(records: list[dict]) -> str:
    """TOFU's byte format: one compact ASCII JSON object per line, `/` escaped, no final newline."""
    # "/" can only occur inside JSON strings, so escaping it textually is safe.
    return "\n".join(json.dumps(r, ensure_ascii=True, separators=(",", ":")).replace("/", "\\/") for r in records)


def write_dataset(out_dir: str | Path, n_authors: int = 100, pairs_per_author: int = 20, seed: int = 0) -> Path:
    """Generate the authors and write every split (see the module docstring); returns `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    author_set = generate_authors(n_authors, pairs_per_author, seed)
    for stem, records in splits(author_set).items():
        (out / f"{stem}.json").write_text(to_json_lines(records), encoding="utf-8")
    (out / "idontknow.jsonl").write_text("\n".join(IDK_ANSWERS) + "\n", encoding="utf-8")
    k10 = n_forget_authors(n_authors, 10)
    truth = [{"name": a.name, "split": "holdout" if i >= n_authors else ("forget10" if i >= n_authors - k10 else "retain90"),
              "facts": a.facts} for i, a in enumerate(author_set.train + author_set.holdout)]
    (out / "authors.json").write_text(to_json_lines(truth), encoding="utf-8")
    return out
