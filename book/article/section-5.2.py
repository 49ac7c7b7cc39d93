import torch
import torch.nn as nn
import torch.optim as optim
from torch.utils.data import DataLoader
from torchvision import datasets, transforms
from torchvision.models import resnet18

# 定义模型
class LanguageModel(nn.Module):
    def __init__(self, vocab_size, embedding_dim, hidden_dim, output_dim, n_layers, drop_prob=0.5):
        super(LanguageModel, self).__init__()
        self.embedding = nn.Embedding(vocab_size, embedding_dim)
        self.rnn = nn.LSTM(embedding_dim, hidden_dim, n_layers, dropout=drop_prob, batch_first=True)
        self.fc = nn.Linear(hidden_dim, output_dim)
        self.dropout = nn.Dropout(drop_prob)
        
    def forward(self, text, hidden):
        embedded = self.dropout(self.embedding(text))
        output, hidden = self.rnn(embedded, hidden)
        embedded = self.dropout(embedded)
        embedded = embedded[-1].unsqueeze(0)
        hidden = self.dropout(hidden)
        return self.fc(embedded), hidden

# 实现训练和预测函数
def train(model, data_loader, criterion, optimizer, epoch, device):
    model.train()
    for batch_idx, (data, target) in enumerate(data_loader):
        data, target = data.to(device), target.to(device)
        optimizer.zero_grad()
        output, hidden = model(data, hidden)
        loss = criterion(output, target)
        loss.backward()
        optimizer.step()
        hidden = hidden.data
        
def predict(model, data_loader, device):
    model.eval()
    with torch.no_grad():
        for batch_idx, (data, target) in enumerate(data_loader):
            data, target = data.to(device), target.to(device)
            output, hidden = model(data, hidden)
            # 输出预测结果
            predictions = output.argmax(dim=1)
            # 计算准确率
            correct = (predictions == target).sum().item()
            print(f"准确率: {correct / len(target) * 100}%")

# 主程序
def main():
    # 加载数据集
    train_data = datasets.MNIST(root='./data', train=True, download=True, transform=transforms.ToTensor())
    test_data = datasets.MNIST(root='./data', train=False, transform=transforms.ToTensor())

    # 定义模型、损失函数和优化器
    model = LanguageModel(vocab_size=10, embedding_dim=32, hidden_dim=64, output_dim=10, n_layers=2)
    criterion = nn.CrossEntropyLoss()
    optimizer = optim.Adam(model.parameters(), lr=0.001)

    # 搭建计算设备
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)

    # 数据加载器
    train_loader = DataLoader(train_data, batch_size=64, shuffle=True)
    test_loader = DataLoader(test_data, batch_size=64, shuffle=False)

    # 训练模型
    for epoch in range(1):
        train(model, train_loader, criterion, optimizer, epoch, device)
    
    # 测试模型
    predict(model, test_loader, device)

if __name__ == "__main__":
    main()
