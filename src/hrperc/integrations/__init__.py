"""hrperc inside other libraries' models: :mod:`hrperc.integrations.transformers`.

Nothing here is imported by ``import hrperc``; each integration imports its library when it is used.
"""
