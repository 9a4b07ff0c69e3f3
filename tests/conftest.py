import os
import sys

# reference.py sits beside the tests and is imported as a plain module
sys.path.insert(0, os.path.dirname(__file__))
