"""What the app shows, as plain functions: figures from data, the cache-view
image, projections, the RoPE explainer, and the per-user run session. Nothing
here imports gradio, so all of it is tested without a browser."""
