"""Drawing only: figures from plain data (``figures``), the cache-view image
(``cacheview``), query projections (``projections``) and the RoPE explainer.
Nothing here runs a model, reads a cache or imports gradio; the app's state and
view assembly live in ``ffviz.app``."""
