"""The classifier service (port 3003), split by job:

    service.py    the BentoML service: thin endpoints that call the modules below
    uploads.py    multipart parsing with limits (images and form fields)
    limits.py     request limits, names and integer fields
    taught.py     the taught state: opens the store in the background, readiness, store calls off the loop
    store.py      the taught examples in SQLite or PostgreSQL (TEACH_STORE), one transaction per change
    postgres_store.py  the PostgreSQL back-end (pgvector search in the database when installed)
    matching.py   nearest taught example: a replica-local cached matrix, or pgvector in the database
    state.py      the export/import format (and the legacy taught.json) with validated embeddings
    faces.py      the face pipeline: detect, landmarks, align, describe, the animal check
    domains.py    the out-of-domain check of each classifier version
    store_benchmark.py  the store's micro-benchmark, back-ends side by side (in-process)
"""
