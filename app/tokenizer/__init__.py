"""Text <-> token ids: the tokenizer (tokenizer.py), the vocabulary of a GGUF file (gguf_vocab.py),
chat templates (chat_template.py) and the UTF-8-safe incremental detokenizer (detokenizer.py).

Nothing is imported here, so the API can import chat_template alone without loading a model file
reader."""
