"""``python -m f2llm.data``: convert the shipped public data into F2LLM-format training sources."""

from f2llm.data.convert import main

raise SystemExit(main())
