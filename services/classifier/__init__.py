"""The classifier service (port 3003), split by job:

    service.py    the BentoML service: thin endpoints that call the modules below
    uploads.py    multipart parsing with limits (images and form fields)
    limits.py     request limits, names and integer fields
    store.py      the taught examples in SQLite or PostgreSQL (TEACH_STORE), one transaction per change
    matching.py   nearest taught example: a replica-local cached matrix, or pgvector in the database
    state.py      the export/import format (and the legacy taught.json) with validated embeddings
"""
