"""
The packages' layering (docs/code.rst), read from the source: what each
package may import, that the server runs without torch and NeMo until the
model is loaded, and that no modules import each other in a cycle.
"""

import ast
import json
import os
import subprocess
import sys

from twisted.trial import unittest

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                       "parakeet")

#: What the modules of each part may import from this project (module
#: prefixes), at module level and anywhere (inside functions too).  The
#: first matching part wins.
RULES = [
    # The torch-free modules every side shares.
    ("parakeet.contract", {"module": (), "anywhere": ()}),
    ("parakeet.audio", {"module": (), "anywhere": ()}),
    ("parakeet.checkpoints", {"module": (), "anywhere": ()}),
    ("parakeet.sockets", {"module": (), "anywhere": ()}),
    ("parakeet.options", {"module": ("parakeet",), "anywhere": ()}),
    # The model side: never the reactor side, the clients or the tools.
    ("parakeet.engine", {"module": ("parakeet.engine", "parakeet.contract",
                                    "parakeet.checkpoints"), "anywhere": ()}),
    # The daemon: the engine only when the model is loaded, from the tap.
    ("parakeet.server.tap", {"module": ("parakeet", "parakeet.server", "parakeet.audio",
                                        "parakeet.checkpoints", "parakeet.options",
                                        "parakeet.contract", "parakeet.sockets"),
                             "anywhere": ("parakeet.engine.engine",
                                          "parakeet.engine.allocator",
                                          "parakeet.engine.nemo.itn")}),
    ("parakeet.server", {"module": ("parakeet.server", "parakeet.audio", "parakeet.contract",
                                    "parakeet.checkpoints", "parakeet.options",
                                    "parakeet.sockets"), "anywhere": ()}),
    # Clients speak the protocol; the bench drives the engine in-process
    # only through the measurements, and only when asked to.
    ("parakeet.clients.bench", {"module": ("parakeet.clients", "parakeet.audio",
                                           "parakeet.options", "parakeet.sockets",
                                           "parakeet.checkpoints", "parakeet.server.messages"),
                                "anywhere": ("parakeet.measuring",)}),
    ("parakeet.clients", {"module": ("parakeet.clients", "parakeet.audio", "parakeet.options",
                                     "parakeet.sockets", "parakeet.checkpoints",
                                     "parakeet.server.messages"), "anywhere": ()}),
    # Measurements and the demo model's training: tools beside the product,
    # which nothing in the product imports.
    ("parakeet.measuring", {"module": ("parakeet",), "anywhere": ("parakeet",)}),
    ("parakeet.training", {"module": ("parakeet.training",), "anywhere": ()}),
    # The command line puts the parts together.
    ("parakeet.cli", {"module": ("parakeet",), "anywhere": ()}),
    ("parakeet.demo", {"module": ("parakeet.server", "parakeet.clients",
                                  "parakeet.checkpoints", "parakeet.options"),
                       "anywhere": ()}),
    ("parakeet.__main__", {"module": ("parakeet.cli",), "anywhere": ()}),
    ("parakeet", {"module": (), "anywhere": ()}),
]

#: Libraries that belong to the reactor side: the engine imports none.
REACTOR_SIDE = ("twisted.internet", "twisted.web", "twisted.application",
                "twisted.protocols", "autobahn")


def modules():
    """{dotted name: path} of every module of the package."""
    found = {}
    for folder, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                dotted = os.path.relpath(path, os.path.dirname(PACKAGE))[:-3].replace(os.sep, ".")
                found[dotted[:-len(".__init__")] if dotted.endswith(".__init__") else dotted] = path
    return found


def imports(name, path, known):
    """(module-level imports, all imports) of a module, as dotted names; a
    ``from package import name`` of a module counts as that module."""
    tree = ast.parse(open(path).read())
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    top, every = set(), set()

    def add(targets, node):
        every.update(targets)
        if node in tree.body or any(node in getattr(n, "body", ()) for n in tree.body
                                    if isinstance(n, (ast.If, ast.Try))):
            top.update(targets)

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            add({alias.name for alias in node.names}, node)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module
            targets = {source}
            targets.update(source + "." + a.name for a in node.names
                           if source + "." + a.name in known)
            add(targets, node)
    return top, every


def _within(name, prefixes):
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def rule_for(name):
    for part, rule in RULES:
        if _within(name, (part,)):
            return part, rule
    raise AssertionError("no rule for %s" % (name,))


class LayeringTests(unittest.TestCase):

    def setUp(self):
        self.modules = modules()
        self.imports = {name: imports(name, path, self.modules)
                        for name, path in self.modules.items()}

    def test_each_part_imports_what_it_may(self):
        wrong = []
        for name, (top, every) in sorted(self.imports.items()):
            part, rule = rule_for(name)
            for target in sorted(every):
                # The package itself holds only its version.
                if not _within(target, ("parakeet",)) or target in (name, "parakeet"):
                    continue
                allowed = rule["module"] + (() if target in top else rule["anywhere"])
                if not _within(target, allowed):
                    wrong.append("%s imports %s%s" % (
                        name, target, "" if target in top else " (in a function)"))
        self.assertEqual(wrong, [])

    def test_the_engine_never_imports_the_reactor_side(self):
        wrong = ["%s imports %s" % (name, target)
                 for name, (_, every) in sorted(self.imports.items())
                 if _within(name, ("parakeet.engine", "parakeet.contract"))
                 for target in sorted(every) if _within(target, REACTOR_SIDE)]
        self.assertEqual(wrong, [])

    def test_nemo_is_imported_in_one_place(self):
        # The engine's NeMo adaptation, and the measurements' replicas built
        # from NeMo configs.
        wrong = ["%s imports %s" % (name, target)
                 for name, (_, every) in sorted(self.imports.items())
                 if not _within(name, ("parakeet.engine.nemo", "parakeet.measuring.replica"))
                 for target in sorted(every) if _within(target, ("nemo",))]
        self.assertEqual(wrong, [])

    def test_no_import_cycles(self):
        graph = {name: {t for t in every if t in self.modules and t != name
                        and not name.startswith(t + ".")}
                 for name, (_, every) in self.imports.items()}
        cycles, state = [], {}

        def visit(node, path):
            state[node] = "open"
            path.append(node)
            for child in sorted(graph[node]):
                if state.get(child) == "open":
                    cycles.append(path[path.index(child):] + [child])
                elif child not in state:
                    visit(child, path)
            path.pop()
            state[node] = "done"

        for node in sorted(graph):
            if node not in state:
                visit(node, [])
        self.assertEqual(cycles, [])

    def test_server_and_clients_start_without_torch_or_nemo(self):
        # What `parakeet-server serve` imports before it loads the model, and
        # what the clients import at all: no torch, no NeMo.
        light = sorted(name for name in self.modules
                       if _within(name, ("parakeet.server", "parakeet.clients",
                                         "parakeet.contract", "parakeet.audio",
                                         "parakeet.checkpoints", "parakeet.options",
                                         "parakeet.cli", "parakeet.demo")))
        code = ("import json, sys\n"
                "for name in %r: __import__(name)\n"
                "print(json.dumps(sorted(m for m in sys.modules "
                "if m.split('.')[0] in ('torch', 'nemo', 'lightning', 'pytorch_lightning'))))"
                % (light,))
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             cwd=os.path.dirname(PACKAGE), timeout=120)
        self.assertEqual(out.returncode, 0, out.stderr)
        self.assertEqual(json.loads(out.stdout.strip().splitlines()[-1]), [])
        self.assertGreater(len(light), 20)
