"""The built-in world: a seeded task in which alignment is measurable on a CPU in minutes.

    World(seed)          knowledge base, questions, train/eval split, gold judge
    World.judge(p, r)    -> Verdict(total, helpful, harmless, honest, polite, category, label, reason)
    write_world(dir)     pretrain / sft / preferences / eval files + world.json
    load_world(dir)      the World a folder was written from

See docs/world.md.
"""

from alignkit.world.judge import Verdict, parse_question
from alignkit.world.kb import KnowledgeBase, make_kb
from alignkit.world.tasks import CATEGORIES, CATEGORY_QUALITIES, QUALITIES, Task, format_prompt
from alignkit.world.world import World
from alignkit.world.write import FORMAT_VERSION, judge_cli, load_world, write_world

__all__ = [
    "CATEGORIES",
    "CATEGORY_QUALITIES",
    "FORMAT_VERSION",
    "QUALITIES",
    "KnowledgeBase",
    "Task",
    "Verdict",
    "World",
    "format_prompt",
    "judge_cli",
    "load_world",
    "make_kb",
    "parse_question",
    "write_world",
]
