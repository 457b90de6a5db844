"""Drawing only: figures from plain data (``figures``), the cache view, filmstrip
and side-by-side frames (``cacheview``), quality over time (``quality``), query
projections (``projections``), the RoPE explainer and the first view's picture
(``story``). Nothing here runs a model, reads a cache or imports gradio; the app's
state and view assembly live in ``ffviz.app``."""
