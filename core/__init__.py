"""sshaudit: SSH session recording and audit without a network proxy.

This package (folder ``core/``) is the small shared core: sans-IO pieces that take bytes
or events in and give bytes or events out, with no files, sockets or clocks inside.

- :mod:`sshaudit.asciicast`: asciicast v2 encoder and decoder.
- :mod:`sshaudit.sealed`: the sealed recording format (FORMAT.md), streaming writer/reader.
- :mod:`sshaudit.keys`: auditor (X25519) and host (Ed25519) key encodings.
- :mod:`sshaudit.termsafe`: neutralising terminal escape sequences for replay and transcripts.
- :mod:`sshaudit.errors`: the one exception tree every part raises.

Invariant: modules here import only the standard library, except ``sealed`` and ``keys``,
which need ``cryptography`` and ``pyhpke``; the per-login processes never import those two.
"""

__version__ = "0.1.0"
