"""Language-model tasks and their data code: ``tasks.py`` registers arithmetic, pytext and jsonl;
``task.py`` is their data object (``LMTaskData``, the family's TaskOps); ``text.py`` encoding and collation;
``canary.py`` planted secrets. Nothing is imported here, so machinery may import ``text`` without cycles."""
