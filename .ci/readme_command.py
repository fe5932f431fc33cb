"""Prints one of the two commands README.md starts with: `main` (the first) or `tests`."""
import re
import sys

text = open("README.md", encoding="utf-8").read()
blocks = re.findall(r"```(?:sh|bash|console)?\n(.*?)```", text, re.S)
if len(blocks) < 2:
    sys.exit("README.md must start with two fenced command blocks: the main job, then the tests")
which = {"main": 0, "tests": 1}[sys.argv[1]]
print(" && ".join(l.strip() for l in blocks[which].strip().splitlines() if l.strip() and not l.startswith("#")))
