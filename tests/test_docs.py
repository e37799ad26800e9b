"""
The README stays a short front door, and the reference it points to in
docs/ is all there: every page in the Sphinx site's table of contents, and
every path the README names present.
"""

import glob
import os
import re

from twisted.trial import unittest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(ROOT, "docs")

#: README.rst's largest size in bytes: what a reader takes in at the door.
README_MAX_BYTES = 15 * 1024


def read(*path):
    with open(os.path.join(ROOT, *path), encoding="utf-8") as f:
        return f.read()


def toctree_entries(text):
    """The documents named by every ``toctree`` directive in text."""
    entries = []
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.strip() != ".. toctree::":
            continue
        for body in lines[i + 1:]:
            if body and not body[0].isspace():
                break  # the directive's body has ended
            entry = body.strip()
            if entry and not entry.startswith(":"):
                # "Title <name>" entries name their document in brackets.
                match = re.search(r"<([^>]+)>$", entry)
                entries.append(match.group(1) if match else entry)
    return entries


def relative_paths(text):
    """The relative paths text refers to: link targets (```text <target>`_``)
    that are not URLs, and every ``docs/...`` path it mentions."""
    targets = re.findall(r"`[^`<]*<([^<>`]+)>`__?", text)
    paths = {t for t in targets if not re.match(r"[a-z][a-z0-9+.-]*:", t) and not t.startswith("#")}
    for mention in re.findall(r"(?<![\w/.-])docs/[\w./-]*", text):
        paths.add(mention.rstrip(".,;:"))
    return sorted(paths)


class ReadmeTests(unittest.TestCase):

    def test_size(self):
        size = os.path.getsize(os.path.join(ROOT, "README.rst"))
        self.assertLessEqual(size, README_MAX_BYTES,
                             "README.rst is %d bytes; move reference material to docs/" % size)

    def test_paths_exist(self):
        paths = relative_paths(read("README.rst"))
        self.assertIn("docs/index.rst", paths)
        missing = [p for p in paths if not os.path.exists(os.path.join(ROOT, p.split("#")[0]))]
        self.assertEqual(missing, [])

    def test_links_every_page(self):
        paths = relative_paths(read("README.rst"))
        pages = sorted(os.path.relpath(p, ROOT).replace(os.sep, "/")
                       for p in glob.glob(os.path.join(DOCS, "*.rst")))
        self.assertEqual([p for p in pages if p not in paths], [])


class SiteTests(unittest.TestCase):

    def test_toctree_lists_every_page(self):
        entries = toctree_entries(read("docs", "index.rst"))
        pages = sorted(os.path.splitext(os.path.basename(p))[0]
                       for p in glob.glob(os.path.join(DOCS, "*.rst")))
        self.assertEqual(sorted(set(pages) - set(entries) - {"index"}), [])
        # ... and names no page that is not there.
        self.assertEqual(sorted(set(entries) - set(pages)), [])

    def test_toctree_entries(self):
        text = ("Title\n=====\n\n.. toctree::\n   :maxdepth: 2\n\n   serving\n"
                "   The protocol <protocol>\n\nAfter the tree.\n")
        self.assertEqual(toctree_entries(text), ["serving", "protocol"])

    def test_relative_paths(self):
        text = ("See `docs/serving.rst <docs/serving.rst>`_, `the site "
                "<https://example.com/docs/x.rst>`_ and docs/protocol.rst.  A\n"
                "path: ``docs/browser-page.png``; the folder docs/.")
        self.assertEqual(relative_paths(text),
                         ["docs/", "docs/browser-page.png", "docs/protocol.rst",
                          "docs/serving.rst"])
