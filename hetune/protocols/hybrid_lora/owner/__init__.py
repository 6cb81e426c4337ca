"""The data owner's side: holds the data, the secret key and the adapters.

Runs the model's non-linearities, LoRA, loss and optimizer, and sends every frozen
product to a backend (:mod:`.backends`): in the clear, in process (:mod:`.local`) or to a
worker over HTTP (:mod:`.remote`). Imports the worker's code only for the in-process
``encrypted`` backend; the worker never imports anything from here.
"""
