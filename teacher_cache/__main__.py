from teacher_cache.cli import main

main()
