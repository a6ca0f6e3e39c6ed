"""Each lesson's figure functions, beside the lessons: ``figures/<lesson>.py`` holds the figures
that lesson draws, ``common.py`` the shared style and the loss curves.

A figure function takes data a lesson computed and returns a matplotlib Figure; the lesson
saves it with ``lessons._common.save_figure``. ``python -m minipeft.figures`` reruns the lessons
and so regenerates every committed figure in ``figures/``.
"""
