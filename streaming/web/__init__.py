"""The web layer: everything that imports Flask. Thin blueprints, the one
authentication hook, errors, validation, rate limits, the page's static files.
"""
