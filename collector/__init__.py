"""The sshaudit collector: the central service every enrolled host ships to (DESIGN.md
"The collector", issue 4).

Invariants, which every module of this package keeps and the tests check:
- the collector never holds an auditor private key and never decrypts a recording: it
  checks sealed files structurally (FORMAT.md framing, bounded lengths) and verifies the
  host's Ed25519 signature over the bytes as stored, which needs no data key;
- recordings, session records and authentication events are append-only: no route of any
  role deletes or rewrites them; a recording only ever grows, by whole frames, at exactly
  its current length, until a verified signature trailer closes it; a finished session
  record and a stored event never change (a replay of the same bytes is accepted and
  changes nothing);
- a host credential writes only that host's sessions and events; tokens are stored as
  SHA-256 hashes only and compared in constant time;
- every refusal is a precise 4xx JSON ``{"error": code, "detail": ...}``, decided before
  anything is stored; a 200 to an upload means the bytes are on disk (fsync).

Layout: :mod:`~sshaudit.collector.upload` (sans-IO upload checks, shared with the agent),
:mod:`~sshaudit.collector.storage` (the storage interface and the embedded SQLite + files
backend), :mod:`~sshaudit.collector.tokens`, :mod:`~sshaudit.collector.ingest` (the rules
above the storage), :mod:`~sshaudit.collector.app` (FastAPI), :mod:`~sshaudit.collector.cli`,
:mod:`~sshaudit.collector.pinning` (the certificate-pinning HTTP client).
"""
