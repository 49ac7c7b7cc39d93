"""The book's own tooling: which files are notebooks, the Colab copies, the labs
(student build). It finds the repository from the working directory."""
