from student_train.cli import main

main()
