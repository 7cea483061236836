"""Vision-language runtime: media input (:mod:`tinyq.vlm.media`), chat sessions with images and
video over one KV cache (:mod:`tinyq.vlm.session`), and ``load_vlm(path)`` for LLaVA / VILA / NVILA."""
