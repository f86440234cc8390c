"""Data tools behind `llava_ft data ...` and the scripts in data_tools/: repeat, replace, convert, check,
stats, demo. Each tool streams its input, names the file/line/record id of any problem, and writes outputs
to a temp file renamed at the end (never over its input; over an existing output only with --force).
"""
